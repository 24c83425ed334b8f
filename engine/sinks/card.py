"""The dataset card (README.md): YAML front matter the Hub and ``load_dataset(OUT)`` read, plus a
short human summary."""

from __future__ import annotations

from typing import Any

import yaml


def dataset_card(*, features, splits: dict[str, dict[str, int]], data_glob: str, title: str,
                 instructions: str | None, stats: dict[str, Any], command: str) -> str:
    from datasets import DatasetInfo, SplitDict, SplitInfo

    split_dict = SplitDict()
    for name, s in splits.items():
        split_dict.add(SplitInfo(name=name, num_bytes=s["num_bytes"], num_examples=s["num_rows"]))
    info = DatasetInfo(features=features, splits=split_dict)._to_yaml_dict()
    info["download_size"] = sum(s["file_bytes"] for s in splits.values())
    info["dataset_size"] = sum(s["num_bytes"] for s in splits.values())
    front = {
        "configs": [{"config_name": "default",
                     "data_files": [{"split": n, "path": data_glob.format(split=n)} for n in splits]}],
        "dataset_info": info,
        "tags": ["image-to-text", "llm-image-extraction"],
    }
    rows = "\n".join(f"| {n} | {s['num_rows']:,} | {s['num_shards']} | {s['file_bytes'] / 1e6:,.1f} MB |"
                     for n, s in splits.items())
    rejected = ", ".join(f"{k}: {v}" for k, v in stats["rejected_by_reason"].items()) or "none"
    body = [
        f"# {title}",
        "",
        "Made by `engine` with:",
        "",
        f"```\n{command}\n```",
        "",
        "| split | rows | shards | size |",
        "|---|---|---|---|",
        rows,
        "",
        f"{stats['num_input_rows']:,} input rows: {stats['num_written']:,} written, "
        f"{stats['num_rejected']:,} rejected ({rejected}). Rejected rows are listed in `rejects.jsonl`, "
        "run statistics in `stats.json`.",
        "",
        "Images are stored upright (EXIF orientation applied and removed).",
    ]
    if instructions is not None:
        quoted = "\n".join("> " + line for line in instructions.splitlines())
        body += ["", "## Instructions", "", quoted, "",
                 "The JSON schema every `output` follows is in `config.json` (`json_schema`)."]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body) + "\n"
