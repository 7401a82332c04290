"""The CPython json loop of the real-server bench: json.loads(json.dumps(doc)) on a
200-item document, for a fixed time on demand, in one long-lived process that
tracers attach to and detach from between measurements.

Protocol: prints "ready", then for each line "run SECS" on stdin runs the loop for
SECS seconds and prints "result docs=N secs=S"; exits when stdin closes.
"""
import json
import sys
import time

DOC = {
    "items": [
        {
            "id": i,
            "name": f"item-{i}",
            "tags": [f"tag{j}" for j in range(i % 5)],
            "price": i * 1.25,
            "active": i % 3 == 0,
        }
        for i in range(200)
    ]
}


def run(secs):
    n = 0
    t0 = time.perf_counter()
    end = t0 + secs
    while True:
        json.loads(json.dumps(DOC))
        n += 1
        if n % 16 == 0 and time.perf_counter() >= end:
            break
    return n, time.perf_counter() - t0


def main():
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["run"]:
            n, dt = run(float(words[1]))
            print(f"result docs={n} secs={dt:.6f}", flush=True)


main()
