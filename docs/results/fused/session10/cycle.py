"""Anatomy of a fused cycle from a ``trace.patch`` trace (session 10): for each fused call, when (ms after the call's
start) the step ended, the durable write started and ended, the 16 answers went out, the next requests arrived, were
read, decoded, preprocessed and submitted; medians over the measured half of the calls.

    python docs/results/fused/session10/cycle.py /tmp/trace.json
"""
import json, statistics as st, sys
EV = json.load(open(sys.argv[1]))
EV.sort()
t0 = EV[0][0]
calls = [i for i,e in enumerate(EV) if e[2]=="call_start"]
rows=[]
for a,b in zip(calls, calls[1:]):
    ta = EV[a][0]; tb = EV[b][0]
    seg = EV[a:b]
    def first(n):
        xs=[e[0]-ta for e in seg if e[2]==n]; return (min(xs), max(xs), len(xs)) if xs else (None,None,0)
    rows.append({n: first(n) for n in ["step_many_end","commit_start","commit_end","answered","send_start","send_body","mw_start","req_start","body_read","decoded","preprocessed","submit"]} | {"cycle": tb-ta})
rows = rows[len(rows)//2:]  # measured round
keys=["step_many_end","commit_start","commit_end","answered","send_start","send_body","mw_start","req_start","body_read","decoded","preprocessed","submit"]
print("cycle median ms", round(st.median(r["cycle"] for r in rows)*1000,1), "n", len(rows))
for k in keys:
    fs=[r[k][0] for r in rows if r[k][0] is not None]; ls=[r[k][1] for r in rows if r[k][1] is not None]; ns=[r[k][2] for r in rows]
    if fs: print(f"{k:15s} first {st.median(fs)*1000:7.1f}  last {st.median(ls)*1000:7.1f}  n {st.median(ns)}")
