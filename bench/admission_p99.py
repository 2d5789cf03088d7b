"""Per-step wall time of a continuous batch while new rows are admitted (issue 22), one process.

    PYTHONPATH=TREE python bench/admission_p99.py MODEL_DIR LABEL

64 prompts of 8-511 random tokens, 32-63 new tokens each (EOS ignored), batch 8, 2 threads,
through `Generator.generate_iterable`; the interval between two decode steps is what a
decoding row waits per token (a new row's prompt blocks run in between). Prints the median,
p90, p99 and max interval, p99 / median, and the job's wall/CPU time and tokens/s. Run it
with PYTHONPATH set to two source trees, alternately, to compare them (bench/README.md).
"""
import sys, time, numpy as np
import gpt2onnx
from gpt2onnx import _engine
gen = gpt2onnx.load(sys.argv[1], threads=2, verify_hashes=False)
stamps = []
orig = _engine.Batch.decode
def decode(self, tokens, *a, **k):
    out = orig(self, tokens, *a, **k)
    stamps.append(time.perf_counter())
    return out
_engine.Batch.decode = decode
rng = np.random.default_rng(7)
reqs = []
for i in range(64):
    n = int(rng.integers(8, 512)); ids = rng.integers(0, 50000, n).tolist()
    reqs.append(gen.prepare(gen.tokenizer.decode(ids), max_new_tokens=int(rng.integers(32, 64)), ignore_eos=True))
list(gen.generate_iterable(reqs[:8], batch_size=8))  # warm
stamps.clear()
t0=time.perf_counter(); c0=time.process_time(); res=list(gen.generate_iterable(reqs, batch_size=8)); T=time.perf_counter()-t0; C=time.process_time()-c0; toks=sum(r.generated_tokens for _,r in res)
d = np.diff(stamps) * 1000
print(f"{sys.argv[2]}: decode steps {len(d)}, per-step ms p50 {np.median(d):.1f} p90 {np.percentile(d,90):.1f} p99 {np.percentile(d,99):.1f} max {d.max():.1f}; p99/p50 {np.percentile(d,99)/np.median(d):.2f}; total {T:.1f} s wall {C:.1f} s CPU, {toks/T:.1f} tok/s")
