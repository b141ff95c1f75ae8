"""Serve a real ClickHouse (the engine inside chdb-core) over HTTP and TCP.

chdb is clickhouse-local as a library. Its listeners run only while a query runs, so this
process starts the listeners and then holds one long blocking query. Data and config live
in the folder given as the first argument (it must contain config.xml with the ports).
SIGTERM ends the process (its default action: a Python-level handler could not run while
the main thread is inside the engine's query call); the data stays in the folder, and
ClickHouse's parts are durable once an INSERT has returned.
"""
import os
import sys

data_dir = os.path.abspath(sys.argv[1])
os.chdir(data_dir)

import chdb._chdb as engine  # noqa: E402  (import after chdir: chdb reads ./config.xml)

engine.query(
    "SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; "
    "SELECT sleepEachRow(1) FROM numbers(1000000000000) FORMAT Null "
    "SETTINGS max_block_size = 1, max_execution_time = 0",
    "CSV",
    path=data_dir,
)
