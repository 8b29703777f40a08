"""The revision of the runtime's layer kernels at each bit-width.

A measured table is true of the kernels it timed. `llmpq profile` records these numbers in every table it writes, and
the cost model names the bit-widths of a table that were timed with older kernels (in the plan's latency sources),
so that a profile taken before a runtime change is re-measured rather than trusted.

Bump a bit-width's number with any change that makes its layers cost differently (a kernel, a weight layout, the
attention path), and add a line here:
- 1: the first tables (2026-11-25).
- 2, every bit-width (2026-11-26): GPU stages attend with the memory-efficient kernel, grouped query heads folded
  onto their key heads, instead of cuDNN's attention, which rebuilt its graph at every new key length.
- 3, 3 bits (2026-11-27): 3-bit weights held as bit-planes, multiplied a block of output rows at a time on the CPU.
- 4, 3 bits (2026-11-27): the planes laid out so that they unpack in 32-bit words, values in order (1.8-3.5x faster
  on the CPU).
- no bump (2026-11-28): on a GPU, dequantized layers keep their scales in half precision and dequantize at most
  64 Mi weights at once. The CPU's kernels did not change, and every GPU table's 3-bit points predate revision 4
  (4-bit on the GPUs with tables runs the int4 kernel, unchanged), so no table is newly out of date.
"""

KERNEL_REVISIONS: dict[int, int] = {16: 2, 8: 2, 4: 2, 3: 4}
