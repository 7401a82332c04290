# The heap census benchmark's Python process: N Order objects (each with a managed
# __dict__ of two ints: about 100 bytes in pymalloc's blocks on 3.11) and N/4 short
# strings, kept; then "ready <pid>". Each later line "count" counts the live objects
# by type from inside, as a user would with gc.get_objects(), and prints
# "counted <objects> in <ms> ms": the in-process peer of leaktrace's census.
import gc
import os
import sys
import time


class Order(object):
    def __init__(self, i):
        self.id = i
        self.total = i * 3


n = int(sys.argv[1])
orders = [Order(i + 1000) for i in range(n)]
names = ["customer-%d" % i for i in range(n // 4)]
sys.stdout.write("ready %d\n" % os.getpid())
sys.stdout.flush()
for line in sys.stdin:
    t = time.perf_counter()
    counts = {}
    objs = gc.get_objects()
    for o in objs:
        k = type(o).__name__
        counts[k] = counts.get(k, 0) + 1
    ms = (time.perf_counter() - t) * 1e3
    sys.stdout.write("counted %d in %.1f ms\n" % (len(objs), ms))
    sys.stdout.flush()
    del objs
