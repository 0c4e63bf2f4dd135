"""Test helper: what a W&B offline run recorded, read from its record file (no network)."""

from __future__ import annotations

import json


def _records(run_file):
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(run_file))
    while (raw := store.scan_record()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw[1])
        yield record.WhichOneof("record_type"), record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_records(run_file) -> tuple[dict, dict]:
    """(config, summary) as dicts."""
    config, summary = {}, {}
    for kind, record in _records(run_file):
        if kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
    return config, summary


def wandb_history(run_file) -> dict:
    """What run.log(...) recorded, as {"key" or "key/field": value}; media and tables are nested
    (e.g. "summary/nrows", "pareto_output_cosine/width")."""
    return {
        _key(i): json.loads(i.value_json)
        for kind, record in _records(run_file)
        if kind == "history"
        for i in record.history.item
    }
