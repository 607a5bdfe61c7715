"""Session 11's held-out rule metrics (RULE.md): python summarize.py TAG:VARIANT ... [--base-dir DIR --base-prefix P]

Per variant (files ``<prefix>_<tag>_rep<seed>.json``, ``..._c200.json``, ``..._c400s<seed>.json`` in this folder, or
in ``--dir``/``--prefix``): the replay metrics of sessions 7-10 plus the mean b64 over seeds 1-5 (criterion (d)); the
continual metrics of sessions 7-10 (W and the min worst-domain gap over all domains), and the same over the domains
not set aside (``SET_ASIDE``, fixed in RULE.md from session 8 round 1's base files before any session-11 number: W'
and min'), and each set-aside domain's mean gap over the streams."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
#: RULE.md: mean source accuracy over the 12 base streams below 30% and base's mean gap there within 5 points
SET_ASIDE = ("gaussian_blur-5@imagenet-c",)


def main(argv):
    d, prefix = HERE, "ho11"
    while argv and argv[0] in ("--dir", "--prefix"):
        if argv[0] == "--dir":
            d = argv[1]
        else:
            prefix = argv[1]
        argv = argv[2:]
    for a in argv:
        tag, var = a.split(":")
        row(d, prefix, tag, var)


def load(d, name):
    p = os.path.join(d, name)
    return json.load(open(p))["results"] if os.path.exists(p) else None


def row(d, prefix, tag, var):
    gaps, b64, b1ok, sizeok = [], [], True, True
    for s in range(1, 6):
        r = load(d, f"{prefix}_{tag}_rep{s}.json")
        if r is None:
            continue
        r = r[f"resnet/replay/{var}"]
        acc = {k: r[k]["accuracy"] for k in ("64", "16", "4", "1")}
        na = r["noadapt"]["accuracy"]
        gaps.append(acc["64"] - acc["4"])
        b64.append(acc["64"])
        b1ok &= acc["64"] - acc["1"] <= 5
        sizeok &= all(a >= na for a in acc.values())
    streams = []
    for name in ["c200"] + [f"c400s{s}" for s in range(1, 6)]:
        r = load(d, f"{prefix}_{tag}_{name}.json")
        if r is None:
            continue
        for sh in ("none", "0.1"):
            x = r[f"resnet/{sh}/{var}"]
            na, ad = x["noadapt"], x["adapted"]
            g = {k: ad["per_domain"][k] - na["per_domain"][k] for k in na["per_domain"]}
            kept = {k: v for k, v in g.items() if k not in SET_ASIDE}
            w, w2 = min(g, key=g.get), min(kept, key=kept.get)
            streams.append((f"{name}/{sh}", na["mean"], ad["mean"], g[w], w, kept[w2], w2,
                            {k: g[k] for k in SET_ASIDE if k in g}))
    n = max(len(streams), 1)
    print(f"{var:8s} replay({len(gaps)}) mean b64-b4 {sum(gaps) / max(len(gaps), 1):.2f} "
          f"mean b64 {sum(b64) / max(len(b64), 1):.2f} b1ok {b1ok} sizes>=na {sizeok}")
    print(f"         continual({len(streams)}) W {sum(s[3] for s in streams) / n:.3f} "
          f"min {min((s[3] for s in streams), default=0):.1f} W' {sum(s[5] for s in streams) / n:.3f} "
          f"min' {min((s[5] for s in streams), default=0):.1f} "
          f"mean-of-means {sum(s[2] for s in streams) / n:.2f} all>na {all(s[2] > s[1] for s in streams)}")
    for k in SET_ASIDE:
        vals = [s[7][k] for s in streams if k in s[7]]
        print(f"         set aside {k}: mean gap {sum(vals) / max(len(vals), 1):+.2f} over {len(vals)} streams")
    for s in streams:
        print(f"   {s[0]:14s} na {s[1]:.1f} ad {s[2]:.1f} worst {s[3]:+.1f} {s[4]:28s} worst' {s[5]:+.1f} {s[6]}")


if __name__ == "__main__":
    main(sys.argv[1:])
