"""ClientApp: a site. "train" replies with the site's coreset rows as an ArrayRecord (the
upload); "evaluate" receives the global bank as an ArrayRecord (the download) and acknowledges.

The rows are the .npy files benchmarks.peers wrote (float32 [rows, D]); flwr ships an Array's
bytes as they are (np.save of the array, no compression).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def upload(msg: Message, context: Context) -> Message:
    site = int(context.node_config["partition-id"])
    rows = np.load(Path(str(context.run_config["data-dir"])) / f"site-{site}.npy")
    content = RecordDict({"coreset": ArrayRecord({"rows": Array(rows)}),
                          "meta": ConfigRecord({"site": site, "rows": int(rows.shape[0])})})
    return Message(content, reply_to=msg)


@app.evaluate()
def download(msg: Message, context: Context) -> Message:
    bank = msg.content.array_records["bank"]["bank"].numpy()
    site = int(context.node_config["partition-id"])
    content = RecordDict({"ack": ConfigRecord({"site": site, "bank_rows": int(bank.shape[0]),
                                               "bank_sum": float(bank.sum(dtype=np.float64))})})
    return Message(content, reply_to=msg)
