"""Session 7's held-out rule metrics (RULE.md) from the ho7_<tag>_*.json files: python summarize.py TAG:VARIANT ...

Session 8's summariser runs this one over its own folder and prefix (``--dir DIR --prefix ho8`` first)."""
import json, sys, os
D = os.path.dirname(os.path.abspath(__file__))
PREFIX = "ho7"
if sys.argv[1:2] == ["--dir"]:
    D, sys.argv[1:3] = sys.argv[2], []
if sys.argv[1:2] == ["--prefix"]:
    PREFIX, sys.argv[1:3] = sys.argv[2], []


def load(name):
    p = os.path.join(D, name)
    return json.load(open(p))["results"] if os.path.exists(p) else None


def row(tag, var):
    gaps, b1ok, sizeok, reps = [], True, True, []
    for s in range(1, 6):
        r = load(f"{PREFIX}_{tag}_rep{s}.json")
        if r is None:
            continue
        r = r[f"resnet/replay/{var}"]
        acc = {k: r[k]["accuracy"] for k in ("64", "16", "4", "1")}
        na = r["noadapt"]["accuracy"]
        gaps.append(acc["64"] - acc["4"]); b1ok &= acc["64"] - acc["1"] <= 5
        sizeok &= all(a >= na for a in acc.values())
        reps.append("/".join(f"{acc[k]:.1f}" for k in ("64", "16", "4", "1")))
    streams = []
    for name, shifts in [("c200", ("none", "0.1"))] + [(f"c400s{s}", ("none", "0.1")) for s in range(1, 6)]:
        r = load(f"{PREFIX}_{tag}_{name}.json")
        if r is None:
            continue
        for sh in shifts:
            x = r[f"resnet/{sh}/{var}"]
            na, ad = x["noadapt"], x["adapted"]
            g = {k: ad["per_domain"][k] - na["per_domain"][k] for k in na["per_domain"]}
            w = min(g, key=g.get)
            streams.append((f"{name}/{sh}", na["mean"], ad["mean"], g[w], w))
    n = len(streams)
    W = sum(s[3] for s in streams) / max(n, 1)
    print(f"{var:8s} replay({len(gaps)}) mean b64-b4 {sum(gaps)/max(len(gaps),1):.2f} gaps {[round(g,1) for g in gaps]} "
          f"b1ok {b1ok} sizes>=na {sizeok}; continual({n}) W {W:.3f} min {min((s[3] for s in streams), default=0):.1f} "
          f"mean-of-means {sum(s[2] for s in streams)/max(n,1):.2f} all>na {all(s[2] > s[1] for s in streams)}")
    for s in streams:
        print(f"   {s[0]:14s} na {s[1]:.1f} ad {s[2]:.1f} worst {s[3]:+.1f} {s[4]}")
    print("   replay", reps)


for a in sys.argv[1:]:
    tag, var = a.split(":")
    row(tag, var)
