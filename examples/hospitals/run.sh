#!/usr/bin/env bash
# The whole hospitals federation on this machine: data, certificates, one server, five clients.
# Run from the repository root:  bash examples/hospitals/run.sh
set -euo pipefail
SHOAL=${SHOAL:-"python -m shoal.federated"}   # or `shoal` once installed
HERE=examples/hospitals
SITES="hospital1,hospital2,hospital3,hospital4,hospital5"

mkdir -p $HERE/runs
python $HERE/make_data.py
[ -f $HERE/certs/ca.pem ] || $SHOAL fed certs --out $HERE/certs --clients $SITES

$SHOAL fed server $HERE/config.toml &
server=$!
for site in ${SITES//,/ }; do
  $SHOAL fed client $HERE/config.toml --data $HERE/data/$site --server 127.0.0.1:8443 --name $site \
    > $HERE/runs/$site.log 2>&1 &
done
wait $server
echo "metrics: $HERE/runs/hospitals/metrics.jsonl   model: $HERE/runs/hospitals/model.safetensors"
