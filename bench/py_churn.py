"""JSON and dict churn, timed inside the interpreter.

Protocol: prints "ready", waits for a line on stdin, runs, prints
"result ns_per_op=N ops=N" (one op = one document built, dumped and parsed),
then waits for stdin to close.
"""
import json
import sys
import time


def one(i):
    doc = {"id": i, "name": f"item-{i}", "tags": [f"t{j}" for j in range(i % 7)],
           "attrs": {f"k{j}": j * 1.5 for j in range(i % 11)}, "payload": "x" * (i % 300)}
    return json.loads(json.dumps(doc))


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    print("ready", flush=True)
    sys.stdin.readline()
    keep = []
    t = time.perf_counter()
    for i in range(n):
        d = one(i)
        if i % 50 == 0:
            keep.append(d)
    dt = time.perf_counter() - t
    print(f"result ns_per_op={dt * 1e9 / n:.1f} ops={n}", flush=True)
    sys.stdin.read()


main()
