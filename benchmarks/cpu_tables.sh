#!/usr/bin/env bash
# Re-measure the timed CPU tables of the chapter READMEs, one run after another, on an otherwise idle machine.
# Timings are only comparable when nothing else runs: a second job on a 2-core machine halves every tokens/s.
#
#   bash benchmarks/cpu_tables.sh            # everything (about 40 minutes on 2 cores)
#   bash benchmarks/cpu_tables.sh spec tp    # only some groups: spec engines serving teaching tp pp dp kv compare
#
# JSON lands in results/cpu/, each run's full log beside it; the READMEs quote these files.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/cpu}
mkdir -p "$OUT"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

run() {  # run NAME CMD...: one measurement, its log in $OUT/NAME.log
  local name=$1; shift
  echo "=== $name ($(date -u +%H:%M:%S)): $*"
  "$@" > "$OUT/$name.log" 2>&1
  echo "--- $name rc=$? ($(date -u +%H:%M:%S))"
}

groups=${*:-spec engines serving teaching tp pp dp kv compare}
for g in $groups; do
  case $g in
    spec)
      run spec $PY -m speculative.benchmark --threads 2 --prompts speculative/prompts_eval.json --num-prompts 4 --sweep-k "" --tree fitted:4,dynamic:5 \
        --medusa-lookup 0,3 --draft-vocab 16384 --max-tokens 64 --out "$OUT/spec_benchmark.json" --plot "$OUT/spec_speedup_vs_k.png" ;;
    engines)
      run engines_offline $PY -m engines.cpu_bench --out "$OUT/engines_cpu_bench.json" ;;
    serving)
      run serving $PY -m engines.vllm.serve --engines ours,vllm --enforce-eager --max-model-len 2048 \
        --max-num-seqs 16 --dataset-name sharegpt --sharegpt-split workload --max-input-len 512 --output-len 128 \
        --num-prompts 16 --request-rate 1 --no-progress --result-dir "$OUT/serving" ;;
    teaching)
      run static_vs_continuous $PY -m engines.teaching.static_vs_continuous --out "$OUT/static_vs_continuous.json"
      run prefix_caching $PY -m engines.teaching.prefix_caching --out "$OUT/prefix_caching.json" ;;
    tp)
      run tp $PY -m parallelism.scaling --tensor-parallel-sizes 1 2 3 --max-tokens 32 --out "$OUT/tp_scaling.json" ;;
    pp)
      for m in 1 2; do
        run pp_mb$m $PY -m torch.distributed.run --nproc-per-node 2 -m parallelism.pipeline_parallel --batch-size 4 \
          --num-microbatches $m --out "$OUT/pp_mb$m.json" --plot "$OUT/pp_mb$m.png"
      done ;;
    dp)
      run dp $PY -m parallelism.data_parallel --num-prompts 12 --out "$OUT/data_parallel.json" ;;
    kv)
      run rag $PY -m kvcache.rag --out "$OUT/rag.json"
      run prompt_compression $PY -m kvcache.prompt_compression --num-prompts 4 --ratios 0.5 \
        --out "$OUT/prompt_compression.json" ;;
    compare)
      run compare $PY -m benchmarks compare --result-dir "$OUT/compare" ;;
    *) echo "unknown group $g"; exit 2 ;;
  esac
done
