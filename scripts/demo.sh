#!/usr/bin/env bash
# Installs everything, makes a small demo dataset, converts it to Hugging Face Parquet with
# the engine (Ray embedded, every core), reads the result back with `datasets`, checks it with
# `engine check` and writes its HTML report (`convert --report`: demo/out-parquet/report.html).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=.venv/bin/python
$PY scripts/make_demo_data.py demo/input
$PY -m engine convert --manifest demo/input/annotations.jsonl --config demo/input/config.json \
    --out demo/out-parquet --overwrite --report "$@" || [ $? -eq 1 ]
$PY - <<'PY'
import json, datasets
ds = datasets.load_dataset("demo/out-parquet", split="train")
stats = json.load(open("demo/out-parquet/stats.json"))
row = ds[0]
print(f"\nloaded {len(ds)} rows with datasets; first: {row['image_id']} {row['image'].size} {row['output']}")
print(f"rejected {stats['num_rejected']} rows: {stats['rejected_by_reason']} (see demo/out-parquet/rejects.jsonl)")
PY
$PY -m engine check demo/out-parquet --quiet && echo "engine check: demo/out-parquet is ready for the Hub and for training"
echo "report: $(pwd)/demo/out-parquet/report.html"
