"""Per-thread shares of a py-spy raw profile recorded with idle samples (``load.py`` with IDLE=1): engine step,
durable write, decode, preprocess, idle pool threads, the event loop (session 10).

    python docs/results/fused/session10/wall_profile.py /tmp/wall.txt
"""
import sys, collections, re
tot=collections.Counter(); cat=collections.defaultdict(collections.Counter)
for line in open(sys.argv[1]):
    stack, n = line.rstrip().rsplit(" ", 1); n=int(n)
    th = stack.split(";",1)[0]
    tot[th]+=n
    s=stack
    if "step_many" in s or "AdaptationEngine.step " in s: k="engine.step_many"
    elif "_write_files" in s: k="write_files"
    elif "_call (service/scheduler" in s: k="sched._call other"
    elif "decode_body" in s: k="decode"
    elif "preprocess" in s.lower(): k="preprocess"
    elif "_worker" in s and ("get (queue" in s or "_WorkItem" not in s): k="pool idle"
    elif "run_forever" in s or "uvicorn" in s or "asyncio" in s: 
        k = "loop idle(select)" if ("select" in s.split(";")[-1] or "poll" in s.split(";")[-1]) else "loop busy"
    else: k=s.split(";")[-1][:80]
    cat[th][k]+=n
for th,t in tot.most_common(12):
    print(th, t)
    for k,v in cat[th].most_common(8): print(f"   {v/t*100:5.1f}% {k}")
