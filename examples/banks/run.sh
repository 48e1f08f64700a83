#!/usr/bin/env bash
# The whole banks federation on this machine. Run from the repository root:
#   bash examples/banks/run.sh
set -euo pipefail
SHOAL=${SHOAL:-"python -m shoal.federated"}   # or `shoal` once installed
HERE=examples/banks
mkdir -p $HERE/runs
python $HERE/make_data.py
[ -f $HERE/certs/ca.pem ] || $SHOAL fed certs --out $HERE/certs --clients bank1,bank2,bank3

$SHOAL fed server $HERE/config.toml &
server=$!
for site in bank1 bank2 bank3; do
  $SHOAL fed client $HERE/config.toml --data $HERE/data/$site --server 127.0.0.1:8444 --name $site \
    > $HERE/runs/$site.log 2>&1 &
done
wait $server
echo "metrics: $HERE/runs/banks/metrics.jsonl   model: $HERE/runs/banks/model.safetensors"
