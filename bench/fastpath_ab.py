"""Lock-step A/B: MEAL's CPU fast path against the same step in plain autograd (the evidence for deleting it).

    python -m bench.fastpath_ab [ROUNDS] [METHOD]      # at this commit only: the refactor after it removes the fast path

Lanes, stepped one step each in rotating order as bench.distill_throughput does: (a) scratch; (b_fast) cached
MEAL as the stage ran it (closed-form loss gradients, the gradient tap, the hand-written D step and fooling
backward, the direct fused-Adam call); (p_plain) the same run with all of those replaced by plain autograd
(build_run(closed_form=False), discriminator_loss + backward + opt.step(), fooling through D frozen), the
layout-keeping mean kept; (q_plain_nolayout) p without the layout-keeping mean either. Patching is per lane,
around each of its turns. Writes bench/results/cpu-fastpath_ab.json."""
import statistics, sys, tempfile, shutil
from pathlib import Path
import torch, torch.nn.functional as F
import bench.distill_throughput as bt
import pipeline.distill as pd, pipeline.align as pa
from pipeline.discriminators import discriminator_loss
from pipeline.config import load_params
from pipeline.device import setup_cpu

def plain_d_step(discs, opt, t, s, rows=0):
    loss, acc = discriminator_loss(discs, t, s, rows)
    opt.zero_grad(set_to_none=True); loss.sum().backward(); opt.step()
    return loss.detach(), acc
def plain_fool(discs, s):
    return F.softplus(-discs(s, frozen=True)).mean(1)
def plain_mean(x, dims):
    return x.mean(dim=tuple(dims), dtype=torch.float32)
ORIG = dict(d=pd.discriminator_step, f=pd.fooling_loss, m=pa.mean_keep_layout)
def patch(plain, layout):
    pd.discriminator_step = plain_d_step if plain else ORIG["d"]
    pd.fooling_loss = plain_fool if plain else ORIG["f"]
    pa.mean_keep_layout = ORIG["m"] if layout else plain_mean

class PLane(bt.Lane):
    def __init__(self, *a, plain=False, layout=True):
        super().__init__(*a); self.plain, self.layout = plain, layout
    def run_steps(self, n):
        patch(self.plain, self.layout)
        try: return super().run_steps(n)
        finally: patch(False, True)

args = bt.argparse.Namespace(samples=2048, views=2, teacher=[], teachers=0, batch_size=0, compile=None, warmup=48,
                             rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 336, method=sys.argv[2] if len(sys.argv) > 2 else "meal", breakdown=False)
setup_cpu()
dev = torch.device("cpu")
work = Path(tempfile.mkdtemp())
s = bt.setup(args, load_params("params.yaml"), work, dev)
runs, train = s["runs"], s["train"]
orig_build = bt.build_run
# two more runs: all plain (closed_form False + plain D/fooling), and all plain without the layout-keeping mean
def mk(closed):
    bt.build_run = lambda *a, **k: orig_build(*a, **k, closed_form=closed)
    r = bt.setup(args, load_params("params.yaml"), work / ("x" + str(closed)), dev)["runs"]["b_cached"]
    bt.build_run = orig_build
    return r
rp = mk(False); rq = mk(False)
lanes = {"a": bt.Lane(*runs["a_scratch"], train, dev), "b_fast": bt.Lane(*runs["b_cached"], train, dev),
         "p_plain": PLane(*rp, train, dev, plain=True, layout=True), "q_plain_nolayout": PLane(*rq, train, dev, plain=True, layout=False)}
bt.lockstep(lanes, 48, 1)
times = bt.lockstep(lanes, args.rounds, 1)
per = 16
sums = {k: [sum(v[i:i+per]) for i in range(0, len(v) // per * per, per)] for k, v in times.items()}
for k in lanes:
    print(k, "vs scratch", round(statistics.median(a / x for a, x in zip(sums["a"], sums[k])), 4),
          " fast/this speed ratio", round(statistics.median(x / b for b, x in zip(sums["b_fast"], sums[k])), 4),
          " ms/step", round(1e3 * statistics.median(times[k]), 2))
shutil.rmtree(work, ignore_errors=True)
from bench.common import header, write_result
ratios = {k: statistics.median(x / b for b, x in zip(sums["b_fast"], sums[k])) for k in lanes}
write_result({**header("fastpath_ab", dev, sys.argv[1:], ("torch",)), "method": args.method, "rounds": args.rounds,
              "block_steps": per, "fast_speedup_over": ratios,
              "vs_scratch": {k: statistics.median(a / x for a, x in zip(sums["a"], sums[k])) for k in lanes},
              "ms_per_step_median": {k: 1e3 * statistics.median(v) for k, v in times.items()}, "turn_times_s": times},
             "fastpath_ab", None)
