"""benchtab: the table end of the tools/bench-* shell scripts (imported by their python heredocs).

A script's results file holds `KEY=v1 v2 ...` lines, one sample per round; keys are
`METRIC@TARGET`. The table shows each target's median and the ratios thinlayer / peer (and
between two thinlayer binaries), so one run on a noisy shared machine reads as ratios.
"""

import statistics
import sys


def load(path):
    """{key: [samples]} from a results file."""
    out = {}
    for line in open(path):
        k, _, v = line.rstrip("\n").partition("=")
        out[k] = [float(x) for x in v.split()]
    return out


def medians(samples):
    """Medians; every key's samples also go to stderr, so the spread of a run is on record."""
    for k in sorted(samples):
        print(f"samples {k}: {' '.join(f'{x:g}' for x in samples[k])}", file=sys.stderr)
    return {k: statistics.median(v) for k, v in samples.items() if v}


def human(b):
    b = float(b)
    for u in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or u == "GiB":
            return f"{b:.0f} {u}" if u == "B" else f"{b:.1f} {u}"
        b /= 1024


def markdown(head, rows):
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in rows:
        print(line(r))


def comparison(med, metrics, tls, peers, labels):
    """Rows of a table: one per (metric label, key, formatter); a column per target, then
    thinlayer/peer ratios for every thinlayer target, then later/first thinlayer binary.

    labels maps a target key to its column title. A missing sample shows as '-'."""
    targets = tls + peers
    head = ["scenario"] + [labels[t] for t in targets]
    pairs = [(a, b) for a in tls for b in peers]
    pairs += [(b, tls[0]) for b in tls[1:]]
    head += [f"{labels[a]} / {labels[b]}" for a, b in pairs]
    rows = []
    for title, key, fmt in metrics:
        v = {t: med.get(f"{key}@{t}") for t in targets}
        row = [title] + [fmt(v[t]) if v[t] is not None else "-" for t in targets]
        for a, b in pairs:
            ok = v[a] is not None and v[b] not in (None, 0)
            row.append(f"{v[a] / v[b]:.2f}" if ok else "-")
        rows.append(row)
    return head, rows
