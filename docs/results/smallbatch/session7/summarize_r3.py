"""Round 3 metrics (RULE.md) from ho7_r3_c<images>s<seed>.json: per stream base vs ch20, then the rule's numbers."""
import json, os
D = os.path.dirname(os.path.abspath(__file__))
rows = {"none": [], "0.1": []}
for s in (6, 7, 8, 9, 10):
    for im in (200, 400):
        p = os.path.join(D, f"ho7_r3_c{im}s{s}.json")
        if not os.path.exists(p):
            continue
        r = json.load(open(p))["results"]
        for sh in ("none", "0.1"):
            out = []
            for v in ("base", "ch20"):
                x = r[f"resnet/{sh}/{v}"]
                na, ad = x["noadapt"], x["adapted"]
                g = {k: ad["per_domain"][k] - na["per_domain"][k] for k in na["per_domain"]}
                w = min(g, key=g.get)
                out.append((na["mean"], ad["mean"], g[w], w))
            rows[sh].append((f"s{s}/{im}", out))
for sh, rs in rows.items():
    print(f"label shift {sh}: {len(rs)} streams")
    for name, ((na, mb, wb, db), (_, mc, wc, dc)) in rs:
        print(f"  {name:8s} no-adapt {na:.1f} | base {mb:.1f} worst {wb:+.1f} {db} | ch20 {mc:.1f} worst {wc:+.1f} {dc}")
    if rs:
        n = len(rs)
        print(f"  mean worst base {sum(o[0][2] for _, o in rs)/n:+.3f} ch20 {sum(o[1][2] for _, o in rs)/n:+.3f}; "
              f"mean of means base {sum(o[0][1] for _, o in rs)/n:.2f} ch20 {sum(o[1][1] for _, o in rs)/n:.2f}")
