"""The fresh-seed round's metrics (RULE.md) from ho10_<tag>_c<images>s<seed>.json (seeds 6-10, 200 and 400 images):
per stream base vs VARIANT, then the rule's numbers. Usage: python summarize_fresh.py TAG VARIANT"""
import json
import os
import sys

D = os.path.dirname(os.path.abspath(__file__))
tag, var = sys.argv[1], sys.argv[2]
rows = {"none": [], "0.1": []}
for s in (6, 7, 8, 9, 10):
    for im in (200, 400):
        p = os.path.join(D, f"ho10_{tag}_c{im}s{s}.json")
        if not os.path.exists(p):
            continue
        with open(p) as f:
            r = json.load(f)["results"]
        for sh in ("none", "0.1"):
            out = []
            for v in ("base", var):
                x = r[f"resnet/{sh}/{v}"]
                na, ad = x["noadapt"], x["adapted"]
                g = {k: ad["per_domain"][k] - na["per_domain"][k] for k in na["per_domain"]}
                w = min(g, key=g.get)
                out.append((na["mean"], ad["mean"], g[w], w))
            rows[sh].append((f"s{s}/{im}", out))
for sh, rs in rows.items():
    print(f"label shift {sh}: {len(rs)} streams")
    for name, ((na, mb, wb, db), (_, mc, wc, dc)) in rs:
        print(f"  {name:8s} no-adapt {na:.1f} | base {mb:.1f} worst {wb:+.1f} {db} | "
              f"{var} {mc:.1f} worst {wc:+.1f} {dc}"
              f"{'' if wc >= wb - 0.5 else '  (worst > 0.5 below base)'}{'' if mc > na else '  (mean <= no adapt.)'}")
    if rs:
        n = len(rs)
        print(f"  mean worst base {sum(o[0][2] for _, o in rs)/n:+.3f} {var} {sum(o[1][2] for _, o in rs)/n:+.3f}; "
              f"mean of means base {sum(o[0][1] for _, o in rs)/n:.2f} {var} {sum(o[1][1] for _, o in rs)/n:.2f}")
