"""Batch generation on a Ray cluster: one engine per worker, prompts sent in chunks to the worker with the
least queued work, results streamed back and written as `generate` writes them.

`ledger.py` keeps the books (which prompt is where, what finished, what to run again) with no Ray in it;
`worker.py` is the actor (it opens the engine like `generate` and runs a continuous batch); `driver.py`
starts the workers, dispatches, collects and writes. Ray is an optional extra (`pip install
'specexec[ray]'`); only the driver and the worker import it.
"""
