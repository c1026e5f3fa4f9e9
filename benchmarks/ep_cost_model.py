"""Chapter-parallel (expert-parallel, EP) communication: what ChapterParallelRead moves, vs shipping K/V.

    python benchmarks/ep_cost_model.py                  # paper config -> benchmarks/results/ep_cost_model.{md,json}
    python benchmarks/ep_cost_model.py --dtype fp32     # fp32 activations
    python benchmarks/ep_cost_model.py --check          # + real gloo trainings at EP=2 and EP=4, logged vs predicted

The model (per rank, per memory layer, per micro-batch; moc_megatron/model/dispatch.py):
U local routing units (micro-batch b x g units per sequence: g = 1 for sequence routing, seq/chunk for
chunk routing), c queries per unit (seq, or chunk), h memory heads and kv memory KV heads per TP rank,
e head dim, k routed top-k, t tokens per chapter, X activation bytes (2 bf16, 4 fp32).

  query dispatch (what the code does), three all-to-alls in forward:
    counts   E x 2 int64 to the group (itself included), E x 2 received
    request  one row per (unit, owner) pair with >= 1 routed pick on that owner (the rank itself included):
             queries c*h*e*X + weights k*4 (fp32, k slots on the wire) + ids k*8 (int64)
    reply    one row per received pair: out c*h*e*X + log-sum-exp c*h*4 (fp32)
  logged (trainer's chapter_bytes_sent / _received, forward only, self-traffic included, summed over
  memory layers and micro-batches of the step):
    sent = 16E + P_send*request + P_recv*reply,   received = 16E + P_recv*request + P_send*reply
  backward: the requester sends the reply gradient (c*h*e*X + c*h*4) per sent pair, the owner the
  request gradient (c*h*e*X + k*4: queries and weights, not ids) per received pair.
  expected pairs per unit, uniform routing, k distinct picks over C_routed chapters, C_routed/E per owner:
    E * (1 - P(miss)),  P(miss) = C(C_routed - C_routed/E, k) / C(C_routed, k)   (exact; log-gamma)
  network bytes exclude the rank's own pairs (expected 1 - P(miss) per unit) and its own counts row.

  ship K/V (the alternative): each rank fetches K and V of the distinct REMOTE chapters its units picked,
  t*kv*e*X each, after sending their ids (8 B each), and returns their gradients in backward:
    E[distinct] = C_routed * (1 - (1 - k/C_routed)^U),  remote fraction (E-1)/E.
  The distinct count is exact in expectation when the U units pick independent uniform k-subsets
  (a chapter escapes one unit with probability exactly 1 - k/C_routed); skewed marginals (by concavity)
  or positively correlated units (chunks of one sequence pick alike) lower it, so for independent units
  it is an upper bound on ship-K/V's bytes. Variant "ship rows": fetch the bank rows (t*d*X) and project locally.

All numbers are bytes per rank per memory layer; per step multiply by memory layers x accumulation.
With --recompute-activations the forward exchange reruns in backward (logged twice). The trainer also
leaves evaluation forwards out of the step records; the EP=2 check evaluates every step to show it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
PAPER_MODEL = ROOT / "configs" / "models" / "moc-paper.yaml"
PAPER_TRAIN = ROOT / "configs" / "train" / "moc-paper-pretrain.yaml"
MiB = 2**20
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


# ---------------------------------------------------------------------------------------------
# Routing probabilities (uniform routing)


def log_comb(n: float, r: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)


def p_owner_missed(routed: int, ep: int, k: int) -> float:
    """P(a unit's k distinct uniform picks avoid one owner's routed/ep chapters)
    = C(routed - routed/ep, k) / C(routed, k)."""
    if routed % ep:
        raise ValueError(f"{ep} owners do not split {routed} routed chapters evenly")
    rest = routed - routed // ep
    if k > rest:  # pigeonhole: every owner surely gets a pick
        return 0.0
    return math.exp(log_comb(rest, k) - log_comb(routed, k))


def expected_pairs_per_unit(routed: int, ep: int, k: int) -> float:
    """E[owners with >= 1 pick] per unit, the rank itself included."""
    return ep * (1.0 - p_owner_missed(routed, ep, k))


def expected_distinct(routed: int, k: int, units: float) -> float:
    """E[distinct chapters among `units` independent uniform k-subsets] (exact in expectation)."""
    return routed * (1.0 - (1.0 - k / routed) ** units) if routed else 0.0


# ---------------------------------------------------------------------------------------------
# One setting


@dataclass(frozen=True)
class EPCase:
    ep: int
    micro_batch: int
    seq: int
    routing_unit: str          # "sequence" | "chunk"
    chunk: int                 # routing_chunk (chunk routing only)
    heads: int                 # memory query heads per TP rank (h)
    kv_heads: int              # memory KV heads per TP rank (kv)
    head_dim: int              # e
    hidden: int                # d (bank row width)
    chapters: int
    shared: int
    chapter_tokens: int        # t
    top_k: int
    dtype_bytes: int           # X
    memory_layers: int = 1
    accumulation: int = 1
    first_chunk: str = "first_token"
    recompute: bool = False    # --recompute-activations: the block's forward, dispatch included, reruns in backward

    @property
    def routed(self) -> int:
        return self.chapters - self.shared

    @property
    def span(self) -> int:           # c, queries per unit
        return self.chunk if self.routing_unit == "chunk" else self.seq

    @property
    def units_per_seq(self) -> int:  # g
        return -(-self.seq // self.chunk) if self.routing_unit == "chunk" else 1

    @property
    def units(self) -> int:          # U
        return self.micro_batch * self.units_per_seq

    @property
    def active_units(self) -> int:   # units that route (chunk 0 may read shared chapters only)
        off = self.micro_batch if self.routing_unit == "chunk" and self.first_chunk == "shared_only" else 0
        return self.units - off

    @classmethod
    def from_config(cls, cfg, world_size: int | None = None, **override) -> "EPCase":
        """From a moc_megatron Config (resolved), as the trainer would run it on `world_size` ranks."""
        mem, t, p = cfg.memory, cfg.training, cfg.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        if pp != 1:
            raise ValueError("the model counts a rank holding every memory layer (pipeline size 1)")
        accumulation = 1
        if world_size is not None and t.global_batch_size:
            accumulation = t.global_batch_size // (t.micro_batch_size * (world_size // tp))
        fields = dict(ep=p.expert_model_parallel_size, micro_batch=t.micro_batch_size, seq=t.seq_length,
                      routing_unit=mem.routing_unit, chunk=mem.routing_chunk, heads=mem.num_heads // tp,
                      kv_heads=mem.num_kv_heads // tp, head_dim=cfg.memory_head_dim, hidden=cfg.model.hidden_size,
                      chapters=mem.chapters, shared=mem.shared_chapters, chapter_tokens=cfg.chapter_tokens,
                      top_k=mem.top_k, dtype_bytes=2 if t.bf16 else 4, memory_layers=len(mem.layers),
                      accumulation=accumulation, first_chunk=mem.first_chunk,
                      recompute=cfg.model.recompute_activations)
        fields.update(override)
        return cls(**fields)


def paper_case(**override) -> EPCase:
    """The paper's model and pretraining settings (configs/models/moc-paper.yaml, moc-paper-pretrain.yaml)."""
    from moc_megatron.config import load_config

    cfg = load_config(PAPER_TRAIN)
    base = dict(ep=1, dtype_bytes=2)  # the paper trains in bf16
    base.update(override)
    return EPCase.from_config(cfg, **base)


# ---------------------------------------------------------------------------------------------
# Bytes


def row_bytes(case: EPCase) -> dict:
    c, h, e, X, k = case.span, case.heads, case.head_dim, case.dtype_bytes, case.top_k
    q = c * h * e * X
    return {"request": q + k * 4 + k * 8, "reply": q + c * h * 4, "reply_grad": q + c * h * 4,
            "request_grad": q + k * 4, "counts": case.ep * 2 * 8}


def _pairs(case: EPCase, pairs) -> tuple[float, float, float]:
    """(P_send, P_recv, P_self) for one layer of one micro-batch on one rank."""
    if pairs is None:
        miss = p_owner_missed(case.routed, case.ep, case.top_k)
        send = case.active_units * case.ep * (1.0 - miss)
        return send, send, case.active_units * (1.0 - miss)
    if isinstance(pairs, dict):
        send = pairs["send"]
        recv = pairs.get("recv", send)
        return send, recv, pairs.get("self", min(send, recv) / case.ep)
    if isinstance(pairs, (tuple, list)):
        send, recv = pairs
        return send, recv, min(send, recv) / case.ep
    return pairs, pairs, pairs / case.ep


def bytes_per_layer(case: EPCase, pairs=None) -> dict:
    """Query dispatch bytes per rank for one memory layer and one micro-batch.

    pairs: None -> expected under uniform routing; a number -> P_send = P_recv = pairs; (send, recv);
    or {"send", "recv", "self"} (observed). Self pairs default to 1/E of the pairs when not given.
    Returns the pair counts, the row sizes, `logged` (forward, self included: what the trainer logs)
    and `network` / `with_self` sent bytes (forward, backward, total). With case.recompute the forward
    exchange runs twice (once more in backward) and is logged twice."""
    send, recv, own = _pairs(case, pairs)
    r = row_bytes(case)
    counts, passes = r["counts"], 2 if case.recompute else 1
    logged_sent = passes * (counts + send * r["request"] + recv * r["reply"])
    logged_recv = passes * (counts + recv * r["request"] + send * r["reply"])
    bwd = send * r["reply_grad"] + recv * r["request_grad"]
    net_fwd = passes * (counts - 16 + (send - own) * r["request"] + (recv - own) * r["reply"])
    net_bwd = (send - own) * r["reply_grad"] + (recv - own) * r["request_grad"]
    return {"pairs_send": send, "pairs_recv": recv, "pairs_self": own, "rows": r,
            "logged": {"sent": logged_sent, "received": logged_recv},
            "with_self": {"forward": logged_sent, "backward": bwd, "total": logged_sent + bwd},
            "network": {"forward": net_fwd, "backward": net_bwd, "total": net_fwd + net_bwd}}


def ship_kv_bytes(case: EPCase, distinct: float | None = None) -> dict:
    """The alternative: fetch K/V (or bank rows) of the distinct remote chapters; sent = received by symmetry."""
    D = expected_distinct(case.routed, case.top_k, case.active_units) if distinct is None else distinct
    R = D * (case.ep - 1) / case.ep
    t, X = case.chapter_tokens, case.dtype_bytes
    kv = 2 * t * case.kv_heads * case.head_dim * X           # K and V of one chapter
    rows = t * case.hidden * X                               # its bank rows
    head = (case.ep - 1) * 8 + R * 8                         # counts + the requested ids
    return {"distinct": D, "remote": R, "chapter_kv_bytes": kv, "chapter_row_bytes": rows,
            "kv": {"forward": head + R * kv, "backward": R * kv, "total": head + 2 * R * kv},
            "rows": {"forward": head + R * rows, "backward": R * rows, "total": head + 2 * R * rows}}


def link_ms(nbytes: float, ep: int, gpus_per_node: int, nvlink_gbs: float, ib_gbs: float) -> float:
    """Time to send `nbytes` spread evenly over the E-1 peers: peers on the node over NVLink, the rest
    over InfiniBand, both links at once (GB/s per direction per GPU)."""
    peers = ep - 1
    if peers <= 0 or nbytes <= 0:
        return 0.0
    on = min(ep, gpus_per_node) - 1
    off = peers - on
    return 1e3 * max(nbytes * on / peers / (nvlink_gbs * 1e9), nbytes * off / peers / (ib_gbs * 1e9))


def bank_summary(case: EPCase, eps) -> dict:
    """Bank memory per rank (bank / E) and, for comparison, what a replicated bank (EP=1) costs instead:
    the data-parallel all-reduce of its gradient, ~2x the gradient bytes per rank per step (ring)."""
    params = case.chapters * case.chapter_tokens * case.hidden
    return {"params": params, "bf16_bytes": 2 * params, "fp32_bytes": 4 * params,
            "train_state_bytes": 16 * params,  # fp32 weight + fp32 grad + Adam m, v
            "per_rank_bf16_bytes": {ep: 2 * params / ep for ep in eps},
            "per_rank_train_state_bytes": {ep: 16 * params / ep for ep in eps},
            "replicated_grad_allreduce_bytes": {"bf16": 2 * 2 * params, "fp32": 2 * 4 * params}}


# ---------------------------------------------------------------------------------------------
# The table


def table_rows(case0: EPCase, eps, micro_batches, links) -> list[dict]:
    rows = []
    for ep in eps:
        for b in micro_batches:
            case = replace(case0, ep=ep, micro_batch=b)
            d, s = bytes_per_layer(case), ship_kv_bytes(case)
            rows.append({
                "routing": case.routing_unit, "ep": ep, "micro_batch": b, "units": case.units,
                "p_miss": p_owner_missed(case.routed, ep, case.top_k),
                "pairs_per_unit": d["pairs_send"] / max(case.active_units, 1),
                "dispatch_network": d["network"], "dispatch_with_self": d["with_self"], "logged": d["logged"],
                "ship_kv": s["kv"], "ship_rows": s["rows"], "kv_distinct": s["distinct"], "kv_remote": s["remote"],
                "kv_over_dispatch": s["kv"]["total"] / d["network"]["total"],
                "ms": {"dispatch": link_ms(d["network"]["total"], ep, **links),
                       "ship_kv": link_ms(s["kv"]["total"], ep, **links),
                       "dispatch_nvlink_only": link_ms(d["network"]["total"], ep, ep, links["nvlink_gbs"], 1),
                       "dispatch_ib_only": link_ms(d["network"]["total"], ep, 1, 1, links["ib_gbs"])}})
    return rows


HEADER = ["E", "b", "U", "pairs/unit", "disp fwd", "disp bwd", "disp total", "logged fwd", "KV remote ch",
          "KV fwd", "KV bwd", "KV total", "KV/disp", "rows total", "ms disp", "ms KV"]


def _row_cells(r: dict) -> list[str]:
    m = lambda x: f"{x / MiB:.2f}"  # noqa: E731
    return [str(r["ep"]), str(r["micro_batch"]), str(r["units"]), f"{r['pairs_per_unit']:.3f}",
            m(r["dispatch_network"]["forward"]), m(r["dispatch_network"]["backward"]),
            m(r["dispatch_network"]["total"]), m(r["logged"]["sent"]), f"{r['kv_remote']:.0f}",
            m(r["ship_kv"]["forward"]), m(r["ship_kv"]["backward"]), m(r["ship_kv"]["total"]),
            f"{r['kv_over_dispatch']:.2f}", m(r["ship_rows"]["total"]), f"{r['ms']['dispatch']:.3f}",
            f"{r['ms']['ship_kv']:.3f}"]


def markdown_table(rows: list[dict]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(_row_cells(r)) + " |" for r in rows]
    return "\n".join(out)


def text_table(rows: list[dict]) -> str:
    cells = [HEADER] + [_row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(c[i].rjust(widths[i]) for i in range(len(HEADER))) for c in cells)


def describe(case: EPCase) -> str:
    return (f"d {case.hidden}, {case.heads} memory heads / {case.kv_heads} KV heads per TP rank, e {case.head_dim}, "
            f"bank {case.chapters} chapters x {case.chapter_tokens} tokens ({case.shared} shared), top-k "
            f"{case.top_k}, seq {case.seq}, {'bf16' if case.dtype_bytes == 2 else 'fp32'} activations")


# ---------------------------------------------------------------------------------------------
# --check: real trainings through the project's trainer (torchrun, gloo), logged vs predicted

BASE_FLAGS = ["--config", str(ROOT / "configs" / "train" / "moc-tiny.yaml"), "--num-layers", "2",
              "--vocab-size", "256", "--memory-layers", "0", "1", "--memory-tokens", "68", "--memory-chapters", "17",
              "--seq-length", "32", "--eval-interval", "0", "--log-interval", "1", "--lr-warmup-iters", "0",
              "--mock-data", "--no-bf16", "--no-recompute-activations"]

# forced: top-k 13 > 16 routed - 16/E (8 at E=2, 12 at E=4): every unit has a pick on every owner.
# observed: top-k 3, P(miss) = 0.39 (E=4) / 0.10 (E=2): the model takes the pair counts the ranks formed.
CHECK_CASES = {
    "ep2_sequence_forced": dict(world=2, mode="forced", flags=[
        "--expert-model-parallel-size", "2", "--memory-top-k", "13", "--memory-routing-unit", "sequence",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "2",
        "--eval-interval", "1", "--eval-iters", "1"]),  # evaluation's traffic must stay out of the step's log
    "ep2_sequence_forced_recompute": dict(world=2, mode="forced", flags=[
        "--expert-model-parallel-size", "2", "--memory-top-k", "13", "--memory-routing-unit", "sequence",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1", "--recompute-activations"]),
    "ep4_chunk_forced": dict(world=4, mode="forced", flags=[
        "--expert-model-parallel-size", "4", "--memory-top-k", "13", "--memory-routing-unit", "chunk",
        "--memory-routing-chunk", "8", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "1"]),
    "ep4_sequence_observed": dict(world=4, mode="observed", flags=[
        "--expert-model-parallel-size", "4", "--memory-top-k", "3", "--memory-routing-unit", "sequence",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "2"]),
    "ep2_chunk_observed": dict(world=2, mode="observed", flags=[
        "--expert-model-parallel-size", "2", "--memory-top-k", "3", "--memory-routing-unit", "chunk",
        "--memory-routing-chunk", "8", "--memory-first-chunk", "shared_only", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "2"]),
}


def _worker(outdir: str, argv: list[str]) -> int:
    """One torchrun rank: the project's trainer, with the pair counts of every exchange recorded."""
    from moc_megatron.model import dispatch
    from moc_megatron.training import trainer
    from moc_megatron import train as train_cli

    calls: list[tuple[int, int]] = []
    steps: list[list[tuple[int, int]]] = []
    count = dispatch.ChapterParallelRead._count

    def _count(self, sent, received):  # sent[1] = queries sent (one row per pair), received[1] = queries received
        calls.append((int(sent[1].shape[0]), int(received[1].shape[0])))
        return count(self, sent, received)

    take = trainer.take_comm_bytes

    def take_comm_bytes(module):
        steps.append(list(calls))
        calls.clear()
        return take(module)

    dispatch.ChapterParallelRead._count = _count
    trainer.take_comm_bytes = take_comm_bytes
    rc = train_cli.main(argv)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(outdir, f"pairs_rank{rank}.json"), "w") as f:
        json.dump(steps, f)
    return rc


def run_training(flags: list[str], world: int, workdir: str, timeout: float = 600) -> dict:
    """Train through torchrun on `world` gloo ranks; returns the JSONL step records and the observed pairs."""
    from moc_megatron.parallel.net import free_port

    log = os.path.join(workdir, "log.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(world),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(Path(__file__).resolve()),
           "--worker", workdir, *flags, "--log-jsonl", log]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in open(log) if line.strip()]
    records = [r for r in records if "chapter_bytes_sent" in r]
    pairs = [json.load(open(os.path.join(workdir, f"pairs_rank{r}.json"))) for r in range(world)]
    return {"records": records, "pairs": pairs}


def check_case(name: str, timeout: float = 600) -> dict:
    """Run one CHECK_CASES entry and compare the logged bytes with the model's, per rank and step."""
    from moc_megatron.config import parse_config

    spec = CHECK_CASES[name]
    flags, world = BASE_FLAGS + spec["flags"], spec["world"]
    cfg = parse_config(flags).validate(world)
    case = EPCase.from_config(cfg, world_size=world)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ep-cost-") as workdir:
        run = run_training(flags, world, workdir, timeout)
    wall = time.perf_counter() - started
    per_step_calls = case.memory_layers * case.accumulation * (2 if case.recompute else 1)  # exchanges per step
    one_pass = replace(case, recompute=False)  # an observed exchange is one pass
    forced_exact = p_owner_missed(case.routed, case.ep, case.top_k) == 0.0
    expected_step = case.memory_layers * case.accumulation * bytes_per_layer(case)["logged"]["sent"]
    steps, worst, worst_expected = [], 0.0, 0.0
    for i, rec in enumerate(run["records"]):
        ranks = []
        for r in range(world):
            calls = run["pairs"][r][i]
            if len(calls) != per_step_calls:
                raise AssertionError(f"{name}: rank {r} step {i + 1}: {len(calls)} exchanges, "
                                     f"expected {per_step_calls}")
            observed = [bytes_per_layer(one_pass, pairs=(s, q)) for s, q in calls]
            if spec["mode"] == "forced":
                sent = received = expected_step
            else:
                sent = sum(o["logged"]["sent"] for o in observed)
                received = sum(o["logged"]["received"] for o in observed)
            got_s, got_r = rec["chapter_bytes_sent"][r], rec["chapter_bytes_received"][r]
            err = max(abs(sent - got_s) / got_s, abs(received - got_r) / got_r) * 100
            err_expected = (expected_step - got_s) / got_s * 100
            worst, worst_expected = max(worst, err), max(worst_expected, abs(err_expected))
            ranks.append({"rank": r, "pairs_send": sum(s for s, _ in calls), "pairs_recv": sum(q for _, q in calls),
                          "predicted_sent": sent, "logged_sent": got_s, "predicted_received": received,
                          "logged_received": got_r, "error_pct": err, "expected_pairs_error_pct": err_expected})
        steps.append({"iteration": rec["iteration"], "ranks": ranks})
    how = ("forced: top-k {k} > routed {C} - routed/E {o}, so every unit has a pick on every owner "
           "(P(miss) = 0); prediction from the config alone").format(k=case.top_k, C=case.routed,
                                                                    o=case.routed - case.routed // case.ep)
    if spec["mode"] != "forced":
        how = (f"observed: top-k {case.top_k}, P(miss) = {p_owner_missed(case.routed, case.ep, case.top_k):.3f}; "
               "the model takes the pair counts each rank formed (recorded in the ranks); the uniform-routing "
               "expectation is shown alongside")
    logged_all = sum(x["logged_sent"] for st in steps for x in st["ranks"])
    expected_all = expected_step * world * len(steps)
    return {"name": name, "mode": spec["mode"], "ep": case.ep, "world": world, "routing": case.routing_unit,
            "first_chunk": case.first_chunk, "units_per_micro_batch": case.units, "active_units": case.active_units,
            "memory_layers": case.memory_layers, "accumulation": case.accumulation, "top_k": case.top_k,
            "dtype_bytes": case.dtype_bytes, "recompute": case.recompute, "forced_exact": forced_exact, "how": how,
            "expected_step_sent": expected_step, "max_error_pct": worst, "expected_pairs_error_pct": worst_expected,
            "expected_vs_logged_all_pct": (expected_all - logged_all) / logged_all * 100,
            "passed": worst <= 1.0 and (spec["mode"] != "forced" or forced_exact), "wall_s": wall,
            "flags": flags, "steps": steps}


def check_summary(res: dict) -> str:
    lines = [f"{res['name']}: EP={res['ep']} on {res['world']} ranks, {res['routing']} routing, "
             f"{res['memory_layers']} memory layers x {res['accumulation']} micro-batches/step"
             f"{' x 2 (recompute)' if res['recompute'] else ''}, "
             f"{res['units_per_micro_batch']} units/micro-batch ({res['active_units']} routing), top-k {res['top_k']}, "
             f"X={res['dtype_bytes']}  [{res['wall_s']:.0f} s]",
             f"  {res['how']}"]
    for s in res["steps"]:
        for r in s["ranks"]:
            lines.append(f"  step {s['iteration']} rank {r['rank']}: "
                         f"pairs sent/recv {r['pairs_send']}/{r['pairs_recv']}"
                         f"  sent predicted {r['predicted_sent']:.0f} logged {r['logged_sent']}"
                         f"  received predicted {r['predicted_received']:.0f} logged {r['logged_received']}"
                         f"  error {r['error_pct']:.4f}%"
                         + ("" if res["mode"] == "forced" else
                            f"  (uniform expectation {res['expected_step_sent']:.0f}: "
                            f"{r['expected_pairs_error_pct']:+.1f}%)"))
    if res["mode"] != "forced":
        lines.append(f"  uniform expectation vs logged, all ranks and steps: {res['expected_vs_logged_all_pct']:+.1f}% "
                     "(sampling noise of a few units; not part of the check)")
    lines.append(f"  => max error {res['max_error_pct']:.4f}% : {'PASS' if res['passed'] else 'FAIL'} (tolerance 1%)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def build(args) -> dict:
    links = dict(gpus_per_node=args.gpus_per_node, nvlink_gbs=args.nvlink_gbs, ib_gbs=args.ib_gbs)
    X = DTYPE_BYTES[args.dtype]
    modes = {"sequence": paper_case(routing_unit="sequence", dtype_bytes=X),
             "chunk": paper_case(routing_unit="chunk", chunk=args.chunk, dtype_bytes=X)}
    return {"dtype": args.dtype, "links": links, "eps": args.eps, "micro_batches": args.micro_batches,
            "config": {m: asdict(c) for m, c in modes.items()},
            "bank": bank_summary(modes["sequence"], args.eps),
            "tables": {m: table_rows(c, args.eps, args.micro_batches, links) for m, c in modes.items()}}


def markdown(result: dict, checks: list[dict]) -> str:
    seq = EPCase(**result["config"]["sequence"])
    L = result["links"]
    out = ["# Chapter-parallel (EP) communication: query dispatch vs shipping K/V", "",
           f"Produced by `python benchmarks/ep_cost_model.py{' --check' if checks else ''}"
           f"{' --dtype fp32' if result['dtype'] == 'fp32' else ''}`. Paper config (configs/models/moc-paper.yaml): "
           f"{describe(seq)}. Bytes **sent per rank per memory layer** (per micro-batch), MiB; per step multiply by "
           f"{seq.memory_layers} memory layers x gradient-accumulation steps. Uniform routing (the load-balance "
           "loss's target).", "",
           "Columns: `pairs/unit` expected (unit, owner) pairs, self included; `disp` query dispatch (what "
           "ChapterParallelRead does) over the network, own pairs excluded; `logged fwd` what the trainer logs "
           "as chapter_bytes_sent (forward, self included); `KV remote ch` expected distinct remote chapters a "
           "rank fetches; `KV` ship K/V (t*kv*e*X each for K and V, plus 8 B ids); `KV/disp` total ratio (> 1: "
           "dispatch moves less); `rows` ship bank rows (t*d*X per chapter) and project locally; `ms` fwd+bwd "
           f"time of the network bytes with {L['gpus_per_node']} GPUs per node on NVLink "
           f"({L['nvlink_gbs']:g} GB/s per direction) and the rest on InfiniBand ({L['ib_gbs']:g} GB/s per GPU), "
           "both at once, bandwidth-bound (no latency).", ""]
    bank = result["bank"]
    GB = 1e9
    out += [f"Bank: {bank['params'] / 1e6:.2f}M parameters = {bank['bf16_bytes'] / GB:.3f} GB bf16, "
            f"{bank['train_state_bytes'] / GB:.2f} GB with fp32 weights, gradients and Adam moments; per rank "
            "(bank / E): " + ", ".join(f"E={ep}: {v / GB:.3f} GB"
                                       for ep, v in bank["per_rank_train_state_bytes"].items())
            + ". A replicated bank (EP=1) moves no chapter traffic but all-reduces the bank gradient over data "
            f"parallelism: ~{bank['replicated_grad_allreduce_bytes']['bf16'] / GB:.2f} GB (bf16 gradients) to "
            f"{bank['replicated_grad_allreduce_bytes']['fp32'] / GB:.2f} GB (fp32) per rank per step, once per step "
            f"whatever the batch; dispatch costs the table's figure x {seq.memory_layers} memory layers x "
            "micro-batches "
            "per step.", ""]
    for mode, rows in result["tables"].items():
        c = EPCase(**result["config"][mode])
        title = ("Sequence routing (paper): one unit per sequence, c = 1024 queries" if mode == "sequence" else
                 f"Chunk routing, chunk {c.chunk}: {c.units_per_seq} units per sequence, c = {c.chunk} queries")
        out += [f"## {title}", "", markdown_table(rows), ""]
    if checks:
        out += ["## Check: real trainings (gloo, CPU, torchrun through moc_megatron.train)", "",
                "| case | EP / ranks | routing | how | step, rank: predicted sent / logged sent | max error |",
                "|---|---|---|---|---|---|"]
        for r in checks:
            cells = "; ".join(f"{s['iteration']},{x['rank']}: {x['predicted_sent']:.0f} / {x['logged_sent']}"
                              for s in r["steps"] for x in s["ranks"])
            out.append(f"| {r['name']} | {r['ep']} / {r['world']} | {r['routing']} | {r['mode']} | {cells} | "
                       f"{r['max_error_pct']:.4f}% {'PASS' if r['passed'] else 'FAIL'} |")
        out += [""] + [f"- {r['name']}: {r['how']}." for r in checks] + [""]
    model = "The model " + __doc__.split("The model ", 1)[1].split("All numbers")[0].strip()
    out += ["## Model", "", "```", model, "```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="activation dtype (X)")
    p.add_argument("--eps", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--chunk", type=int, default=128, help="routing chunk of the chunk-routing table")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink-gbs", type=float, default=450.0, help="NVLink GB/s per direction per GPU")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="InfiniBand GB/s per GPU (400 Gb/s)")
    p.add_argument("--check", action="store_true", help="also run real EP=2 / EP=4 trainings and compare")
    p.add_argument("--check-cases", nargs="+", default=list(CHECK_CASES), choices=list(CHECK_CASES))
    p.add_argument("--out", default=str(RESULTS / "ep_cost_model"), help="output prefix (.json, .md); '' for none")
    args = p.parse_args(argv)

    result = build(args)
    for mode, rows in result["tables"].items():
        print(f"\n== {mode} routing, {describe(EPCase(**result['config'][mode]))}; "
              "MiB sent per rank per memory layer ==")
        print(text_table(rows))
    checks = []
    if args.check:
        print("\n== check: real trainings on gloo ==")
        for name in args.check_cases:
            res = check_case(name)
            print(check_summary(res), flush=True)
            checks.append(res)
        result["check"] = checks
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out + ".md").write_text(markdown(result, checks))
        print(f"\nwrote {args.out}.json, {args.out}.md")
    return 0 if all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
