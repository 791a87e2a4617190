#!/usr/bin/env bash
# GPU deployment check (issue 4), meant to finish within ~8 minutes on one GPU.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_out)
#
# Writes OUT_DIR/gpu_report.json and OUT_DIR/gpu_report.md, plus one log per section.
# Sections: facts (nvidia-smi, versions) -> export (tiny, random weights, S2L2A+S1GRD -> DEM) ->
# torch_cuda (eager reference fp32/fp16, CUDA events) -> ort_cuda (runtime on ONNX Runtime CUDA,
# IOBinding, CUDA graphs) -> tensorrt (tm-build-engines, tm-compare-trt, runtime on TensorRT).
# A section that cannot run (no GPU, no onnxruntime-gpu, no tensorrt, a timeout) is REPORTED as
# "not run" or "failed" with its reason; the script itself always gets to the report.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=${1:-${OUT:-$ROOT/gpu_check_out}}
PY=${PYTHON:-python}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}   # whole script; each section gets min(its limit, what is left)
mkdir -p "$OUT_DIR/parts" "$OUT_DIR/work"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export TM_GPU_CHECK_OUT="$OUT_DIR" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SCRIPT="$OUT_DIR/work/gpu_check_sections.py"

cat >"$SCRIPT" <<'PYEOF'
"""The sections of scripts/gpu_check.sh; each writes parts/<section>.json with a status."""
import json, os, subprocess, sys, time, traceback
from pathlib import Path

import numpy as np

OUT = Path(os.environ["TM_GPU_CHECK_OUT"])
WORK = OUT / "work"
EXPORT = WORK / "tiny"
MODS = ["S2L2A", "S1GRD"]
TARGET = "DEM"
TIMESTEPS = 10
ITERS, WARMUP = 20, 3


def write(section, status, reason="", **data):
    (OUT / "parts" / f"{section}.json").write_text(json.dumps(
        {"section": section, "status": status, "reason": reason, **data}, indent=2, default=str) + "\n")


def stats(samples_ms):
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "min_ms": float(a.min()), "n": int(a.size)}


def wall(fn, iters=ITERS, warmup=WARMUP):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter(); fn(); out.append((time.perf_counter() - t) * 1e3)
    return stats(out)


def inputs(batch=1, seed=0):
    from tm_runtime.modalities import get_modality
    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((batch, get_modality(m).num_channels, 224, 224)).astype(np.float32) for m in MODS}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def facts():
    out = {}
    try:
        q = "name,compute_cap,memory.total,driver_version,clocks.max.sm,power.limit"
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
        out["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        out["nvidia_smi"] = f"not available: {exc}"
    versions = {}
    for mod in ("torch", "onnxruntime", "tensorrt", "polygraphy", "cuda", "onnx"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "installed")
        except Exception as exc:  # noqa: BLE001 - any import failure is a fact to report
            versions[mod] = f"missing ({type(exc).__name__}: {exc})"
    out["versions"] = versions
    try:
        import onnxruntime as ort
        out["ort_providers"] = ort.get_available_providers()
    except Exception as exc:  # noqa: BLE001
        out["ort_providers"] = f"n/a: {exc}"
    try:
        import torch
        out["torch_cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            out["torch_device"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001
        out["torch_cuda"] = f"n/a: {exc}"
    write("facts", "ok", **out)


def export():
    from tm_export.export import ExportConfig, export as run_export
    t = time.perf_counter()
    run_export(ExportConfig(size="tiny", modalities=MODS, output_modalities=[TARGET], out=EXPORT, random_init=True,
                            tokenizer_size="small", validate=False, overwrite=True), log=lambda s: None)
    write("export", "ok", seconds=time.perf_counter() - t, dir=str(EXPORT),
          note="tiny, random weights, small tokenizers, validation skipped (tests cover it)")


def torch_cuda():
    import torch
    if not torch.cuda.is_available():
        return write("torch_cuda", "not run", "torch has no CUDA device here")
    from tm_export.export import ExportConfig, build_reference, build_tokenizers
    cfg = ExportConfig(size="tiny", modalities=MODS, output_modalities=[TARGET], out=EXPORT, random_init=True,
                       tokenizer_size="small")
    model, _ = build_reference(cfg, log=lambda s: None)
    toks, _ = build_tokenizers(cfg, [TARGET], log=lambda s: None)
    unet = toks[TARGET].decoder
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(0)}

    def events(fn, iters=ITERS, warmup=WARMUP):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); fn(); e.record(); e.synchronize(); out.append(s.elapsed_time(e))
        return stats(out)

    import contextlib
    m, u = model.to(dev), unet.to(dev)
    # fp16 = autocast over the fp32 weights (what a PyTorch user would do; pure .half() breaks
    # float32 timestep embeddings and norms).
    def bench(dtype_name, amp):
        for batch in (1, 4):
            x = {k: torch.from_numpy(v).to(dev) for k, v in inputs(batch).items()}
            with torch.inference_mode(), amp():
                res[f"embed_{dtype_name}_b{batch}"] = events(lambda: m(x))
                enc = m(x)[-1]
                emb = torch.cat([m.embedding(n).position_embedding(img) for n, img in x.items()], dim=1)
                res[f"decoder_{dtype_name}_b{batch}"] = events(lambda: m.target_logits(enc, emb, TARGET))
                xt = torch.randn(batch, 1, 224, 224, device=dev)
                tt = torch.full((batch,), 500, device=dev, dtype=torch.int64)
                q = torch.rand(batch, 5, 14, 14, device=dev) * 2 - 1
                res[f"unet_step_{dtype_name}_b{batch}"] = events(lambda: u(xt, tt, q))

                def generate_like():  # encoder + decoder + argmax + TIMESTEPS UNet steps, all on device
                    e = m(x)[-1]
                    ids = m.target_logits(e, emb, TARGET).argmax(-1)
                    z = xt
                    for _ in range(TIMESTEPS):
                        z = u(z, tt, q)
                    return ids, z
                res[f"generate_like_{dtype_name}_b{batch}_T{TIMESTEPS}"] = events(generate_like, iters=5, warmup=1)
    attempt(res, "fp32", lambda: bench("fp32", contextlib.nullcontext))
    attempt(res, "fp16", lambda: bench("fp16", lambda: torch.autocast("cuda", torch.float16)))
    res["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    write("torch_cuda", "partly failed" if res.get("failed_steps") else "ok", ", ".join(res.get("failed_steps", [])),
          note="eager tm_export reference; CUDA events; generate_like omits host sampling/DDIM "
          "update (device-only upper bound)", **res)


def ort_cuda():
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return write("ort_cuda", "not run", f"onnxruntime-gpu missing (providers: {ort.get_available_providers()})")
    from tm_runtime import TerraMindRuntime
    from tm_runtime.backends.ort_cuda import OrtCudaBackend
    res = {}
    cpu = TerraMindRuntime(EXPORT)
    rt = TerraMindRuntime(EXPORT, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    for batch in (1, 4):
        x = inputs(batch)
        res[f"runtime_embed_b{batch}"] = wall(lambda: rt.embed(x))
        res[f"runtime_embed_b{batch}_max_rel_vs_cpu"] = rel(rt.embed(x), cpu.embed(x))
    x = inputs(1)
    res[f"runtime_generate_b1_T{TIMESTEPS}"] = wall(lambda: rt.generate(x, [TARGET], timesteps=TIMESTEPS, seed=0),
                                                    iters=3, warmup=1)
    # IOBinding backend: the runtime's host-in/host-out protocol, and outputs kept on the device.
    m = cpu.manifest
    paths = {n: m.graph_path(n) for n in m.graphs}
    tokens = np.random.default_rng(0).standard_normal((1, 392, 192)).astype(np.float32)
    io = OrtCudaBackend(paths, m)
    attempt(res, "per_graph_iobinding", lambda: res.update(per_graph_iobinding=per_graph_breakdown(
        TerraMindRuntime(EXPORT, backend=io), io)))
    res["iobinding_encoder_b1_run_device"] = wall(lambda: io.run_device("encoder", {"tokens": tokens}, ["layer_11"]))
    ref = cpu.backend.run("encoder", {"tokens": tokens}, ["layer_11"])[0]
    res["iobinding_encoder_max_rel_vs_cpu"] = rel(io.run("encoder", {"tokens": tokens}, ["layer_11"])[0], ref)
    try:
        g = OrtCudaBackend(paths, m, enable_cuda_graph=True)
        feeds = lambda: {"x_t": np.zeros((1, 1, 224, 224), np.float32), "t": np.full((1,), 500, np.int64),  # noqa: E731
                         "quant": np.zeros((1, 5, 14, 14), np.float32), "ddim": np.array([0.9, 0.4, 0.3, 0.95], np.float32)}
        res["cuda_graph_unet_b1"] = wall(lambda: g.run_device(f"unet_{TARGET}", feeds()))
        plain = OrtCudaBackend(paths, m)
        res["plain_unet_b1"] = wall(lambda: plain.run_device(f"unet_{TARGET}", feeds()))
        res["cuda_graph_unet_max_rel_vs_plain"] = rel(g.run(f"unet_{TARGET}", feeds())[0],
                                                      plain.run(f"unet_{TARGET}", feeds())[0])
    except Exception as exc:  # noqa: BLE001 - CUDA graphs need every node on the CUDA EP
        res["cuda_graph"] = f"failed: {type(exc).__name__}: {exc}"
    write("ort_cuda", "ok", note="wall clock (perf_counter), host arrays in and out unless run_device", **res)


def per_graph_breakdown(rt, backend):
    """H2D / GPU compute / D2H p50 (ms) per graph of one generate, as tm-bench --backend reports it."""
    from tm_bench.device import RecordingBackend, device_breakdown
    recorder = RecordingBackend(backend)
    original, rt.backend = rt.backend, recorder
    try:
        rt.generate(inputs(1), [TARGET], timesteps=2, seed=0)
    finally:
        rt.backend = original
    return {g: {k: round(v["p50"], 3) for k, v in row.items() if isinstance(v, dict)}
            for g, row in device_breakdown(backend, recorder.feeds, warmup=1, iters=3).items()}


def attempt(res, key, fn):
    """Run one sub-step; an exception is recorded under ``key`` and the section goes on."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        res[key] = f"failed: {type(exc).__name__}: {exc}"
        res.setdefault("failed_steps", []).append(key)


def tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return write("tensorrt", "not run", f"tensorrt not importable: {exc}")
    from tm_runtime import TerraMindRuntime
    from tm_runtime.backends.tensorrt import TensorRTBackend
    from tm_runtime.trt.build import BuildSettings, build_engines
    from tm_runtime.trt.compare import compare
    res = {}
    graphs = [f"embed_{m}" for m in MODS] + ["encoder", "decoder", f"decoder_query_{TARGET}", f"decoder_head_{TARGET}",
                                             f"unet_{TARGET}"]
    timing_cache = EXPORT / "engines" / "timing.cache"

    def build_and_compare(precision, names):
        t = time.perf_counter()
        built = build_engines(EXPORT, BuildSettings(precision, (1, 1, 4), 2048, timing_cache), names,
                              log=lambda s: None)
        res[f"build_{precision}_seconds"] = time.perf_counter() - t
        res[f"build_{precision}"] = {r.graph: {"built": r.built, "seconds": round(r.seconds, 2)} for r in built}
        rows = compare(EXPORT, precision, batch=2, profile_batch=(1, 1, 4), graphs=names, workspace_mb=2048,
                       build_missing=False, log=lambda s: None)
        res[f"compare_{precision}"] = [dict(graph=r.graph, output=r.output, max_abs=r.max_abs, max_rel=r.max_rel,
                                            mismatch=r.mismatch, tol=r.tolerance, passed=r.passed) for r in rows]

    # fp16 for every graph the runtime needs; fp32 (TF32 off) for two graphs, as an accuracy anchor.
    attempt(res, "fp16", lambda: build_and_compare("fp16", graphs))
    attempt(res, "fp32", lambda: build_and_compare("fp32", ["encoder", f"unet_{TARGET}"]))

    def cached_again():  # a second build with the same settings must rebuild nothing
        again = build_engines(EXPORT, BuildSettings("fp16", (1, 1, 4), 2048, timing_cache), graphs,
                              log=lambda s: None)
        res["second_build_all_cached"] = not any(r.built for r in again)
    attempt(res, "cache", cached_again)
    cpu = TerraMindRuntime(EXPORT)

    def runtime_on_trt(cuda_graphs):
        tag = "fp16_cudagraph" if cuda_graphs else "fp16"
        rt = TerraMindRuntime(EXPORT)
        be = TensorRTBackend.from_export(EXPORT, precision="fp16", batch=(1, 1, 4), workspace_mb=2048,
                                         graphs=graphs, cuda_graphs=cuda_graphs)
        try:
            rt.backend = be  # the runtime only calls backend.run(name, feeds, outputs)
            res[f"activations_{tag}"] = {"shared_mib": be.activations.shared_bytes / 2**20,
                                         "separate_mib": be.activations.separate_bytes / 2**20}
            for batch in (1, 4):
                x = inputs(batch)
                res[f"runtime_embed_{tag}_b{batch}"] = wall(lambda: rt.embed(x))
                res[f"runtime_embed_{tag}_b{batch}_max_rel_vs_cpu"] = rel(rt.embed(x), cpu.embed(x))
            x = inputs(1)
            res[f"runtime_generate_{tag}_b1_T{TIMESTEPS}"] = wall(
                lambda: rt.generate(x, [TARGET], timesteps=TIMESTEPS, seed=0), iters=3, warmup=1)
            tokens = np.random.default_rng(0).standard_normal((1, 392, 192)).astype(np.float32)
            res[f"run_device_encoder_{tag}_b1"] = wall(lambda: (be.run_device("encoder", {"tokens": tokens}),
                                                                be.synchronize()))
            if not cuda_graphs:  # trtexec-style H2D / GPU compute / D2H per graph (tm-bench --backend)
                res[f"per_graph_{tag}"] = per_graph_breakdown(rt, be)
        finally:
            be.close()
    attempt(res, "runtime_fp16", lambda: runtime_on_trt(False))
    attempt(res, "runtime_fp16_cudagraph", lambda: runtime_on_trt(True))
    status = "ok" if not res.get("failed_steps") else "partly failed"
    write("tensorrt", status, ", ".join(res.get("failed_steps", [])),
          note="wall clock; runtime = host arrays in/out through TensorRTBackend", **res)


if __name__ == "__main__":
    name = sys.argv[1]
    try:
        globals()[name]()
    except Exception as exc:  # noqa: BLE001 - report, never crash the check
        write(name, "failed", f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
PYEOF

# run SECTION LIMIT_S: one section under a timeout; a crash or timeout without a part file is recorded.
run() {
  local name=$1 limit=$2 left=$((BUDGET_S - SECONDS - 20))
  if [ "$left" -lt 15 ]; then
    printf '{"section": "%s", "status": "not run", "reason": "time budget used up"}\n' "$name" >"$OUT_DIR/parts/$name.json"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, ${SECONDS}s elapsed)"
  timeout --kill-after=10 "$limit" "$PY" "$SCRIPT" "$name" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  if [ ! -s "$OUT_DIR/parts/$name.json" ]; then
    local why="exit code $rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="timed out after ${limit}s"
    printf '{"section": "%s", "status": "failed", "reason": "%s (see %s.log)"}\n' "$name" "$why" "$name" \
      >"$OUT_DIR/parts/$name.json"
  fi
  echo "   $(grep -o '"status": "[^"]*"' "$OUT_DIR/parts/$name.json" | head -1)"
}

rm -f "$OUT_DIR"/parts/*.json
run facts 45
run export 120
if grep -q '"status": "ok"' "$OUT_DIR/parts/export.json"; then
  run torch_cuda 100
  run ort_cuda 90
  run tensorrt 240
else
  for s in torch_cuda ort_cuda tensorrt; do
    printf '{"section": "%s", "status": "not run", "reason": "the export failed"}\n' "$s" >"$OUT_DIR/parts/$s.json"
  done
fi

# Assemble the report (plain python: works even when torch/onnxruntime are broken).
"$PY" - "$OUT_DIR" "$SECONDS" <<'PYEOF'
import json, sys
from pathlib import Path
out, elapsed = Path(sys.argv[1]), sys.argv[2]
order = ["facts", "export", "torch_cuda", "ort_cuda", "tensorrt"]
parts = {}
for name in order:
    p = out / "parts" / f"{name}.json"
    parts[name] = json.loads(p.read_text()) if p.is_file() else {"status": "not run", "reason": "no result"}
(out / "gpu_report.json").write_text(json.dumps({"elapsed_s": int(elapsed), "sections": parts}, indent=2) + "\n")
lines = ["# GPU check report", "", f"Elapsed: {elapsed} s", "", "| section | status | reason |", "|---|---|---|"]
lines += [f"| {n} | {parts[n]['status']} | {parts[n].get('reason', '')} |" for n in order]
for n in order:
    body = {k: v for k, v in parts[n].items() if k not in ("section", "status", "reason", "traceback")}
    lines += ["", f"## {n}", ""]
    for k, v in body.items():
        if isinstance(v, dict) and "p50_ms" in v:
            lines.append(f"- {k}: p50 {v['p50_ms']:.3f} ms, p90 {v['p90_ms']:.3f} ms, min {v['min_ms']:.3f} ms (n={v['n']})")
        elif isinstance(v, list) and v and isinstance(v[0], dict) and "max_rel" in v[0]:
            lines.append(f"- {k}:")
            lines += [f"  - {r['graph']}.{r['output']}: max_abs {r['max_abs']:.3e}, max_rel {r['max_rel']:.3e}"
                      + (f", mismatch {r['mismatch']:.2e}" if r.get("mismatch") is not None else "")
                      + f" (tol {r['tol']:.0e}) {'ok' if r['passed'] else 'FAIL'}" for r in v]
        else:
            lines.append(f"- {k}: {json.dumps(v, default=str)}")
    if "traceback" in parts[n]:
        lines += ["", "```", parts[n]["traceback"], "```"]
(out / "gpu_report.md").write_text("\n".join(lines) + "\n")
print(f"report: {out / 'gpu_report.md'}")
PYEOF
exit 0
