# Issue 14 (and 15, with PATTERN=[s]limllm.py), the calls after the one that starts the row jobs (issue14_rows*.sh): wait up to T
# seconds (default 500) for them, sampling the GPU's utilization every 20 s into
# /tmp/lr/gpu_util.log, then return every finished or partial part file, the jobs' logs and
# each llmcq run's log in $OUT/lr.tgz (parts/*.json, *.log, parts/logs/).
T=${T:-500}; end=$(( $(date +%s) + T )); P=${PATTERN:-[l]earned_rounding.py}
while [ "$(date +%s)" -lt $end ] && pgrep -f "$P" >/dev/null; do
  sleep 20
  echo "$(date +%T) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)" \
    >> /tmp/lr/gpu_util.log
  for f in /tmp/lr/parts/logs/*.log; do  # blocks done per running llmcq run
    [ -f "$f" ] && echo "$(date +%T) $(basename $f) $(grep -c "block loss\|: done" $f)"; done >> /tmp/lr/progress.log
  echo "$(date +%T) running: $(pgrep -fc "$P")"; grep -h "full" /tmp/lr/*.log | tail -n 3
done
tail -n 3 /tmp/lr/gpu_util.log; tail -n 8 /tmp/lr/progress.log
for f in /tmp/lr/*.log; do echo "== $f"; tail -n 4 $f; done
(cd /tmp/lr && tar czf $OUT/lr.tgz parts $(ls *.log)); ls -la $OUT
