# Issue 14, device calls 2 and 3: wait up to T seconds (default 500) for the row jobs that
# bench/gpu/issue14_rows.sh started, then return every finished or partial part file, the
# jobs' logs and each llmcq run's log in $OUT/lr.tgz (parts/*.json, *.log, parts/logs/).
T=${T:-500}; end=$(( $(date +%s) + T ))
while [ "$(date +%s)" -lt $end ] && pgrep -f learned_rounding.py >/dev/null; do
  sleep 20; echo "$(date +%T) running: $(pgrep -fc learned_rounding.py)"; grep -h "full" /tmp/lr/*.log | tail -n 3
done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
for f in /tmp/lr/*.log; do echo "== $f"; tail -n 4 $f; done
(cd /tmp/lr && tar czf $OUT/lr.tgz parts $(ls *.log)); ls -la $OUT
