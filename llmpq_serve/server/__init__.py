"""The OpenAI-compatible HTTP API, independent of Ray and of the model runtime: `openai_app.build_app` over an
`engine.Engine`."""
