"""ServerApp: one round of the benchmark's federation over Flower's transport.

Waits for ``sites`` SuperNodes, asks each for its rows ("train": the upload), then sends every
site the global bank ("evaluate": the download) and writes the timings (seconds, wall clock of
this process) and what arrived to ``out`` as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    sites = int(config["sites"])
    data = Path(str(config["data-dir"]))
    deadline = time.monotonic() + 300
    nodes: list[int] = []
    while len(nodes) < sites:
        nodes = sorted(grid.get_node_ids())
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {sites} SuperNodes connected")
        time.sleep(0.2)
    start = time.perf_counter()
    asks = [Message(RecordDict({"ask": ConfigRecord({"round": 1})}), dst_node_id=node,
                    message_type="train") for node in nodes]
    replies = list(grid.send_and_receive(asks, timeout=600))
    uploaded = time.perf_counter()
    rows = {}
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"site reply failed: {reply.error}")
        meta = reply.content.config_records["meta"]
        array = reply.content.array_records["coreset"]["rows"].numpy()
        rows[int(meta["site"])] = int(array.shape[0])
    bank = np.load(data / "bank.npy")
    sends = [Message(RecordDict({"bank": ArrayRecord({"bank": Array(bank)})}), dst_node_id=node,
                     message_type="evaluate") for node in nodes]
    acks = list(grid.send_and_receive(sends, timeout=600))
    done = time.perf_counter()
    banks = []
    for ack in acks:
        if ack.has_error():
            raise RuntimeError(f"site ack failed: {ack.error}")
        banks.append(int(ack.content.config_records["ack"]["bank_rows"]))
    Path(str(config["out"])).write_text(json.dumps({
        "upload_s": uploaded - start, "download_s": done - uploaded, "round_s": done - start,
        "rows": rows, "bank_rows": banks,
    }))
