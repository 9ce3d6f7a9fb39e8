"""Compares an Autobahn fuzzingclient report with the committed expectations.

Usage: compare.py REPORT_INDEX_JSON EXPECTED_JSON [--write]
Exits 1 on any difference (a case whose behavior or close behavior changed, a case added or
missing), printing each one. --write records the current report as the new expectations.

An expectation is [behavior, behaviorClose], or a list of such pairs for the few cases whose
outcome depends on timing (see "timing" in expected.json): any listed pair matches.
"""
import json
import sys


def key(case):
    return [int(x) for x in case.split(".")]


def main():
    report_path, expected_path = sys.argv[1], sys.argv[2]
    report = json.load(open(report_path))
    (agent,) = report.keys()
    got = {c: [v["behavior"], v["behaviorClose"]] for c, v in report[agent].items()}
    if "--write" in sys.argv:
        ordered = {c: got[c] for c in sorted(got, key=key)}
        json.dump(ordered, open(expected_path, "w"), indent=1)
        print(f"wrote {len(got)} cases to {expected_path}")
        return 0
    expected = json.load(open(expected_path))
    timing = expected.pop("timing", {})
    diffs = []
    for case in sorted(set(got) | set(expected), key=key):
        want = expected.get(case)
        ok = got.get(case) == want or (
            case in timing and isinstance(want, list) and got.get(case) in want
        )
        if not ok:
            diffs.append(f"  {case}: expected {want}, got {got.get(case)}")
    counts = {}
    for b, _ in got.values():
        counts[b] = counts.get(b, 0) + 1
    print(f"autobahn: {len(got)} cases, {counts}")
    if diffs:
        print("autobahn: differences from the expected results:")
        print("\n".join(diffs))
        return 1
    print("autobahn: matches the expected results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
