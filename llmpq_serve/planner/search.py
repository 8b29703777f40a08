"""The search that turns a Problem into a Plan under a method's rules.

For every (bit set, first device, last device, micro-batch pair) the count relaxation gives a lower bound and a
candidate: its per-stage bit counts are laid out in concrete device orders, bits are placed on the layers where they
hurt least, and the result is evaluated exactly. Candidates are taken in order of their bounds until the best plan is
within the gap tolerance of the smallest bound left; where laying out loses too much (a quality budget that only the
relaxation met, say), the exact ILP for that order runs, warm-started from the layout."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, replace

from llmpq_serve.planner.ilp import solve_order
from llmpq_serve.planner.plan import Plan, SolverStats, StagePlan
from llmpq_serve.planner.problem import InfeasibleError, Problem, even_split
from llmpq_serve.planner.relaxation import Relaxation
from llmpq_serve.spec import DeviceSpec

SOLVER = "HiGHS via PuLP"
Combo = tuple[float, DeviceSpec, DeviceSpec, int, int]  # (lower bound, first device, last device, µb prefill, decode)
FAST_COMBOS = 8  # relaxation combos, best LP bound first, that the fast heuristic lays out
LAST_RESORT_S = 1.0  # per relaxation, past the time limit, where the search has no plan yet


@dataclass(frozen=True)
class Rules:
    """What a method may choose. LLM-PQ chooses everything; baselines and ablations fix parts of it."""

    method: str
    uniform_bits: bool = False          # one bit-width for the whole model
    highest_bits_that_fit: bool = False  # bit-width chosen for quality (the highest that fits), not by the objective
    phase_aware: bool = True            # separate prefill and decode micro-batch sizes
    even_split: bool = False            # layers split evenly over the devices
    # The fast heuristic: plans from the rounded LP relaxations of the most promising combos, no MILP.
    fast: bool = False


@dataclass
class Candidate:
    objective: float
    devices: list[DeviceSpec]
    bits: list[list[int]]
    mb_prefill: int
    mb_decode: int


@dataclass
class SearchState:
    best: Candidate | None = None
    notes: list[str] = field(default_factory=list)
    cut_short: bool = False  # the time limit stopped a part of the search before it proved what that part holds

    def out_of_time(self, note: str | None = None) -> None:
        self.cut_short = True
        if note:
            self.notes.append(note)

    def offer(self, problem: Problem, devices: list[DeviceSpec], bits: list[list[int]], mb_p: int,
              mb_d: int) -> float | None:
        pred, over = problem.evaluate(devices, bits, mb_p, mb_d)
        budget = problem.quality.budget
        if over or (budget is not None and pred.quality > budget + 1e-9):
            return None
        obj = problem.objective(pred.latency_s, pred.quality)
        if self.best is None or obj < self.best.objective - 1e-12:
            self.best = Candidate(obj, list(devices), [list(b) for b in bits], mb_p, mb_d)
        return obj


def micro_batch_pairs(problem: Problem, rules: Rules) -> list[tuple[int, int]]:
    sizes = problem.micro_batch_candidates()
    return [(p, d) for p in sizes for d in sizes] if rules.phase_aware else [(m, m) for m in sizes]


def bit_sets(problem: Problem, rules: Rules) -> list[tuple[int, ...]]:
    if not rules.uniform_bits:
        return [problem.bits]
    budget = problem.quality.budget
    return [(b,) for b in problem.bits if budget is None or problem.indicator.uniform_quality(b) <= budget + 1e-9]


def endpoint_pairs(problem: Problem) -> list[tuple[DeviceSpec, DeviceSpec]]:
    """(first, last) device: one representative per device class, two different devices unless there is one."""
    devices = problem.cluster.devices
    if len(devices) == 1:
        return [(devices[0], devices[0])]
    pairs = []
    for a in problem.classes:
        for b in problem.classes:
            if a is b and len(a.devices) < 2:
                continue
            pairs.append((a.devices[0], b.devices[1] if a is b else b.devices[0]))
    return pairs


def search(problem: Problem, rules: Rules, time_limit: float = 10.0, gap: float = 0.01,
           seeds: tuple[Plan, ...] = ()) -> Plan:
    """`seeds`: plans known beforehand (e.g. baselines' plans, which lie inside LLM-PQ's space) that start the search
    as incumbents, so the result is never worse than any of them."""
    start = time.perf_counter()
    if problem.n_devices > problem.model.layers:
        raise InfeasibleError(f"{problem.n_devices} devices but only {problem.model.layers} layers: every device "
                              "holds at least one layer; use fewer devices")
    state = SearchState()
    for seed in seeds:
        state.offer(problem, [s.device for s in seed.stages], [s.bits for s in seed.stages],
                    seed.prefill_micro_batch, seed.decode_micro_batch)
    bound: float | None = None
    for bits in bit_sets(problem, rules):
        if rules.even_split:
            _search_even(problem, bits, rules, state)
            bound = None
        else:
            b = _search_relaxed(problem, bits, rules, state, start, time_limit, gap)
            bound = b if bound is None else min(bound, b)
        if rules.highest_bits_that_fit and state.best is not None:
            break
    if state.best is None and rules.fast:  # the heuristic found nothing: the exact search decides
        exact = search(problem, replace(rules, fast=False), time_limit, gap, seeds)
        exact.solver.notes.append("fast heuristic found no feasible plan; solved exactly instead")
        return exact
    if state.best is None:
        raise InfeasibleError(infeasibility_report(problem, rules, timed_out=state.cut_short, time_limit=time_limit))
    return _to_plan(problem, rules, state, bound, time.perf_counter() - start, gap)


def _search_relaxed(problem: Problem, bits: tuple[int, ...], rules: Rules, state: SearchState, start: float,
                    time_limit: float, gap: float) -> float:
    """Returns a lower bound on every plan of this bit set (inf where none is feasible, -inf where the time limit
    left endpoints unranked)."""
    combos, complete = _ranked_combos(problem, bits, rules, state, start + time_limit)
    bounds = [rank for rank, *_ in combos]
    laid_out = 0
    for i, (rank, first, last, mb_p, mb_d) in enumerate(combos):
        if _closed(state, rank, gap):
            break  # every combo left is bounded by at least this
        if time.perf_counter() - start > time_limit:
            state.out_of_time("time limit reached before every bound was closed")
            break
        rel = Relaxation(problem, bits, first, last, mb_p, mb_d)
        bounds[i] = lower = max(rank, rel.lp_bound())
        if not math.isfinite(lower) or _closed(state, lower, gap):
            continue
        if rules.fast:  # the LP's rounded counts, laid out; nothing proved, so the combos after these are not bounded
            _realise(problem, bits, rules, rel, lower, state, start, time_limit, gap)
            laid_out += 1
            if laid_out == FAST_COMBOS:
                break
            continue
        result = rel.solve(time_limit=max(0.2, time_limit - (time.perf_counter() - start)), gap=gap / 4)
        if result.objective is None:
            if result.status == "infeasible":
                bounds[i] = math.inf
            else:
                state.out_of_time()
                bounds[i] = max(lower, result.bound or lower)
            continue
        bounds[i] = max(lower, result.bound if result.bound is not None else result.objective)
        if not _closed(state, bounds[i], gap):
            bounds[i] = _realise(problem, bits, rules, rel, bounds[i], state, start, time_limit, gap)
    if state.best is None and state.cut_short:
        _lay_out_best_ranked(problem, bits, rules, state, combos, start, time_limit, gap)
    return min(bounds, default=math.inf) if complete else -math.inf


def _lay_out_best_ranked(problem: Problem, bits: tuple[int, ...], rules: Rules, state: SearchState,
                         combos: list[Combo], start: float, time_limit: float, gap: float) -> None:
    """The time limit came before the first plan: the best-ranked combos' relaxations solved (briefly) and laid out
    without the exact search, until one gives a plan. A plan with nothing proved beats none, above all for a server
    re-planning. (The LP's rounded counts, which the fast heuristic lays out, often overfill a device.)"""
    for rank, first, last, mb_p, mb_d in combos[:FAST_COMBOS]:
        rel = Relaxation(problem, bits, first, last, mb_p, mb_d)
        result = rel.solve(time_limit=LAST_RESORT_S, gap=gap)
        if result.objective is not None:
            _realise(problem, bits, replace(rules, fast=True), rel, rank, state, start, time_limit, gap)
        if state.best is not None:
            state.notes.append("time limit reached before the first plan: the best-ranked combos were laid out "
                               "instead, without the exact search")
            return


def _ranked_combos(problem: Problem, bits: tuple[int, ...], rules: Rules, state: SearchState,
                   deadline: float) -> tuple[list[Combo], bool]:
    """Every (first, last, prefill micro-batch, decode micro-batch) with a lower bound, smallest first, and whether
    that is every one. With separate micro-batches the bound of a pair is the sum of a prefill-only and a decode-only
    relaxation: the objective is the sum of the two parts, so the sum of their minima bounds it, and 2n small LPs
    rank n^2 pairs. Past `deadline` (perf_counter), once some combo is feasible, the endpoint pairs not ranked yet
    are left out."""
    pairs = micro_batch_pairs(problem, rules)
    combos = []
    for first, last in endpoint_pairs(problem):
        if time.perf_counter() > deadline and any(c[0] < math.inf for c in combos):  # 32 devices take seconds
            state.out_of_time("time limit reached while ranking the endpoints and micro-batch sizes")
            return _usable(combos), False
        if rules.phase_aware:
            # each size once: the pairs hold every size once per size of the other phase
            pre = {p: Relaxation(problem, bits, first, last, p, None).lp_bound() for p in {p for p, _ in pairs}}
            dec = {d: Relaxation(problem, bits, first, last, None, d).lp_bound() for d in {d for _, d in pairs}}
            combos += [(pre[p] + dec[d], first, last, p, d) for p, d in pairs]
        else:
            combos += [(-math.inf, first, last, p, d) for p, d in pairs]
    return _usable(combos), True


def _usable(combos: list[Combo]) -> list[Combo]:
    """The combos some plan may come from (an infinite bound: not even the LP is feasible), smallest bound first."""
    return sorted((c for c in combos if c[0] < math.inf), key=lambda c: c[0])


def _realise(problem: Problem, bits: tuple[int, ...], rules: Rules, rel: Relaxation, lower: float,
             state: SearchState, start: float, time_limit: float, gap: float) -> float:
    """Turns a solved relaxation into plans and returns the combo's lower bound, raised where that was proved.

    First its layouts; where they stay further than the gap from the bound (the relaxation placed bits on layers that
    no contiguous layout can give them), the exact ILP of every device order with the same first and last class,
    best layout first. When every order's ILP finishes, the smallest of their optima bounds the combo."""
    mb_p, mb_d = rel.mb_prefill, rel.mb_decode
    scored = {}
    for devs, stage_bits in arrange(problem, rel):
        obj = state.offer(problem, devs, stage_bits, mb_p, mb_d)
        key = _class_sequence(devs)
        if obj is not None and (key not in scored or obj < scored[key][0]):
            scored[key] = (obj, stage_bits)
    if len(bits) == 1 or rules.fast or _closed(state, lower, gap):
        return lower
    first, last = rel.slots[0].device, rel.slots[-1].device
    all_orders, complete = device_orders(problem)
    orders = [o for o in all_orders if _same_class(o[0], first) and _same_class(o[-1], last)]
    orders.sort(key=lambda o: scored.get(_class_sequence(o), (math.inf,))[0])
    proved = []
    for devs in orders:
        left = time_limit - (time.perf_counter() - start)
        if left <= 0.2:
            state.out_of_time("time limit reached while solving device orders exactly")
            return lower
        warm = scored.get(_class_sequence(devs), (None, None))[1]
        cutoff = state.best.objective * (1 - gap / 2) if state.best is not None else None
        sol = solve_order(problem, devs, bits, mb_p, mb_d, warm=warm, time_limit=left, gap=gap / 2, lower=lower,
                          cutoff=cutoff)
        if sol.bits:
            state.offer(problem, devs, sol.bits, mb_p, mb_d)
        if sol.result.status == "infeasible":
            proved.append(cutoff if cutoff is not None else math.inf)
        elif sol.result.status == "optimal":
            proved.append(sol.result.objective)
        else:
            state.out_of_time()
            return lower  # out of time on this order: nothing more is proved
        if _closed(state, lower, gap):
            return lower
    return max(lower, min(proved, default=lower)) if complete else lower


def _closed(state: SearchState, lower: float, gap: float) -> bool:
    return state.best is not None and state.best.objective <= lower * (1 + gap)


def _same_class(a: DeviceSpec, b: DeviceSpec) -> bool:
    return (a.node, a.gpu) == (b.node, b.gpu)


def _class_sequence(devices: list[DeviceSpec]) -> tuple[tuple[str, str], ...]:
    return tuple((d.node, d.gpu) for d in devices)


def _search_even(problem: Problem, bits: tuple[int, ...], rules: Rules, state: SearchState) -> None:
    sizes = even_split(problem.model.layers, problem.n_devices)
    stage_bits = [[bits[0]] * n for n in sizes]
    for devices in device_orders(problem)[0]:
        for mb_p, mb_d in micro_batch_pairs(problem, rules):
            state.offer(problem, devices, stage_bits, mb_p, mb_d)


def device_orders(problem: Problem, limit: int = 5040) -> tuple[list[list[DeviceSpec]], bool]:
    """Distinct device orders (orders that only swap interchangeable devices are one), and whether that is all of
    them: beyond `limit` distinct orders only orders that keep each class together are listed."""
    labels = [c.label for c in problem.classes for _ in c.devices]
    total = math.factorial(len(labels))
    for c in problem.classes:
        total //= math.factorial(len(c.devices))
    if total <= limit:
        sequences = _multiset_permutations(labels)
    else:
        blocks = [[c.label] * len(c.devices) for c in problem.classes]
        sequences = [[x for blk in perm for x in blk] for perm in itertools.permutations(blocks)][:limit]
    by_label = {c.label: c.devices for c in problem.classes}
    orders = []
    for seq in sequences:
        used: dict[str, int] = {}
        order = []
        for lab in seq:
            order.append(by_label[lab][used.get(lab, 0)])
            used[lab] = used.get(lab, 0) + 1
        orders.append(order)
    return orders, total <= limit


def _multiset_permutations(items: list[str]) -> list[list[str]]:
    out: list[list[str]] = []
    counts: dict[str, int] = {}
    for x in items:
        counts[x] = counts.get(x, 0) + 1

    def walk(prefix: list[str]) -> None:
        if len(prefix) == len(items):
            out.append(list(prefix))
            return
        for x, left in counts.items():
            if left:
                counts[x] -= 1
                prefix.append(x)
                walk(prefix)
                prefix.pop()
                counts[x] += 1

    walk([])
    return out


def arrange(problem: Problem, relaxed: Relaxation, limit: int = 24) -> list[tuple[list[DeviceSpec], list[list[int]]]]:
    """Concrete layouts of a relaxation's per-stage bit counts. First and last stay as solved; the middle stages are
    grouped by device class (fewest inter-node hops) with the class blocks in every order (up to `limit`), and from
    the best of those a swap search moves stages whose bits hurt least where the layers are least sensitive. Bits are
    then placed within each stage where they hurt least."""
    slots, counts = relaxed.slots, relaxed.counts
    tail = len(slots) - 1
    blocks: dict[tuple[str, str], list[int]] = {}
    for j in range(1, tail):
        blocks.setdefault((slots[j].device.node, slots[j].device.gpu), []).append(j)
    ends = ([0], [tail] if tail else [])
    sequences = [ends[0] + [j for blk in perm for j in blk] + ends[1]
                 for perm in itertools.islice(itertools.permutations(blocks.values()), limit)]

    def layout(seq: list[int]) -> tuple[list[DeviceSpec], list[list[int]]]:
        return [slots[j].device for j in seq], place_bits(problem, [counts[j] for j in seq])

    def quality(seq: list[int]) -> float:
        return problem.indicator.quality([b for stage in layout(seq)[1] for b in stage])

    best = min(sequences, key=quality)
    improved = True
    while improved:
        improved = False
        for a, b in itertools.combinations(range(1, len(best) - 1), 2):
            if counts[best[a]] == counts[best[b]]:
                continue
            trial = list(best)
            trial[a], trial[b] = trial[b], trial[a]
            if quality(trial) < quality(best) - 1e-12:
                best, improved = trial, True
    return [layout(seq) for seq in sequences + [best]]


def place_bits(problem: Problem, counts: list[dict[int, int]]) -> list[list[int]]:
    """Within each stage, the highest bits go to the layers with the largest quality cost. Exact when ω[l][b] is a
    per-layer scale times a per-bit curve (the analytic default); a good start for the ILP otherwise."""
    omega, out, layer = problem.omega, [], 0
    lowest = min(problem.bits)
    for count in counts:
        n = sum(count.values())
        layers = list(range(layer, layer + n))
        by_cost = sorted(layers, key=lambda l: -omega[l][lowest])
        ordered_bits = [b for b in sorted(count, reverse=True) for _ in range(count[b])]
        assigned = dict(zip(by_cost, ordered_bits))
        out.append([assigned[l] for l in layers])
        layer += n
    return out


def _to_plan(problem: Problem, rules: Rules, state: SearchState, bound: float | None, wall: float,
             gap_tol: float) -> Plan:
    best = state.best
    assert best is not None
    pred, _ = problem.evaluate(best.devices, best.bits, best.mb_prefill, best.mb_decode)
    stages, layer = [], 0
    for dev, bits in zip(best.devices, best.bits):
        stages.append(StagePlan(device=dev, layers=(layer, layer + len(bits)), bits=bits))
        layer += len(bits)
    if rules.fast:
        gap, bound, status = None, None, "heuristic"
    elif rules.even_split:
        gap, bound, status = None, None, "optimal"  # every order and micro-batch was evaluated
    elif bound is not None and math.isfinite(bound):
        gap = max(0.0, (best.objective - bound) / best.objective)
        status = "optimal" if gap <= 1e-4 else "near-optimal" if gap <= gap_tol else "gap"
    else:
        gap, bound, status = None, None, "feasible"
    return Plan(model=problem.model, cluster=problem.cluster, workload=problem.workload, quality=problem.quality,
                indicator=problem.indicator.source,
                latency_sources={g: problem.cost.latency_source(problem.cluster_gpu(g))
                                 for g in dict.fromkeys(d.gpu for d in problem.cluster.devices)},
                stages=stages, prefill_micro_batch=best.mb_prefill, decode_micro_batch=best.mb_decode,
                predicted=pred,
                solver=SolverStats(method=rules.method, status=status, objective=best.objective, lower_bound=bound,
                                   gap=gap, wall_s=wall, solver=SOLVER, notes=state.notes))


def infeasibility_report(problem: Problem, rules: Rules, timed_out: bool = False, time_limit: float = 0.0) -> str:
    """Why nothing fits, in terms a user can act on: which devices lack how much memory, or which rule or quality
    budget rules the remaining plans out. `timed_out`: the time limit cut the search short, so nothing but a
    shortage of memory is proved, and short of that the way out is more time."""
    gib = 1024**3
    low = min(problem.bits)
    per_layer = problem.layer_memory(low)
    devices = problem.cluster.devices
    n = len(devices)
    fixed_by_end = {(a, b): problem.stage_fixed_memory(1, 1, a, b) for a in (False, True) for b in (False, True)}
    workspace = [problem.stage_workspace(d.gpu) for d in devices]

    def fixed(j: int, first: int, last: int) -> float:
        return fixed_by_end[(j == first, j == last)] + workspace[j]

    def holds(first: int, last: int) -> list[int]:
        return [max(0, int((problem.usable_memory(d.gpu) - fixed(j, first, last)) // per_layer))
                for j, d in enumerate(devices)]

    # the search orders the devices, so the embeddings and the head go where they cost the fewest layers
    ends = [(0, 0)] if n == 1 else [(f, la) for f in range(n) for la in range(n) if f != la]
    each = max((holds(f, la) for f, la in ends), key=sum)
    capacity = sum(each)
    lines = []
    for j, d in enumerate(devices):
        least = min(fixed(j, f, la) for f, la in ends)  # what it carries wherever it stands in the chain
        room = problem.usable_memory(d.gpu) - least
        if room < per_layer:
            lines.append(f"{d.id} ({d.gpu}) lacks {(per_layer - room) / gib:.2f} GiB for even one layer "
                         f"(usable {problem.usable_memory(d.gpu) / gib:.2f} GiB, embeddings/activations/workspace at least "
                         f"{least / gib:.2f} GiB wherever it stands)")
    w, m = problem.workload, problem.model
    where = (f"{m.name} on {problem.cluster.summary()} for batch {w.batch_size} x {problem.context} tokens: at {low} bits "
             f"a layer needs {per_layer / gib:.2f} GiB (weights + KV cache)")
    if capacity < m.layers or lines:
        short = max(0, m.layers - capacity) * per_layer
        by_device = ", ".join(f"{d.id} {k}" for d, k in zip(devices, each))
        head = (f"{where}; the devices hold at most {capacity} of {m.layers} layers ({by_device}), "
                f"{short / gib:.1f} GiB missing")
        return "; ".join([head] + lines) + ". Add devices, use a smaller batch or shorter sequences."
    if timed_out:
        return (f"{where}; the devices have memory enough, but the search stopped at its time limit of "
                f"{time_limit:g} s before it found a plan. Give it more time (llmpq plan --time-limit, or "
                "plan_time_limit in a serve config).")
    if rules.even_split:
        size = max(even_split(m.layers, len(devices)))
        tight = min(devices, key=lambda d: problem.usable_memory(d.gpu))
        held = size * per_layer + problem.stage_workspace(tight.gpu)
        inner = held + problem.stage_fixed_memory(1, 1, False, False)
        end = held + problem.stage_fixed_memory(1, 1, True, False)
        return (f"{where}; an even split puts {size} layers on every device: {inner / gib:.2f} GiB at {low} bits, "
                f"{end / gib:.2f} GiB on the first stage with the embeddings, while {tight.id} offers "
                f"{problem.usable_memory(tight.gpu) / gib:.2f} GiB. An uneven split (method pipeedge or llmpq) fits.")
    if problem.quality.budget is not None:
        return (f"{where}; the model fits, but no plan meets the quality budget {problem.quality.budget:.4f} "
                f"within memory under method {rules.method}. Relax the budget or add memory.")
    return f"{where}; no plan of method {rules.method} fits within memory."
