# eval19: wait for the jobs up to T seconds, return their JSON and logs
for i in $(seq 1 ${T:-500}); do [ $(ls /tmp/et/DONE_* 2>/dev/null | wc -l) -ge 4 ] && break; sleep 1; done
cp /tmp/et/*.json $OUT/ 2>/dev/null
(cd /tmp/et && tar czf $OUT/logs.tgz *.log bench/results/logs)
ls /tmp/et; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
tail -n 4 /tmp/et/table_*.log; tail -n 12 /tmp/et/parity.log
