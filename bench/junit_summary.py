"""What bench/gpu_check.sh reads from pytest's JUnit XML report: the test counts and the figures tests record.

    python bench/junit_summary.py REPORT.xml counts     # "N passed, F failed, E errors, S skipped"
    python bench/junit_summary.py REPORT.xml figures    # one Markdown bullet per recorded figure

A test records a figure with pytest's ``record_property("gpu_figure", text)`` (tests/test_cuda_graph.py does),
so that a figure measured under ``pytest -q -n 6`` still reaches the check's summary. Exit 2 on a bad command
line or an unreadable report.
"""
from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List

FIGURE_PROPERTY = "gpu_figure"


def counts(root: ET.Element) -> Dict[str, int]:
    """Tests, failures, errors and skips summed over the report's test suites, plus ``passed``."""
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


def figures(root: ET.Element) -> List[str]:
    """``(test id) text`` for every ``gpu_figure`` property, in report order."""
    found = []
    for case in root.iter("testcase"):
        for prop in case.iter("property"):
            if prop.get("name") == FIGURE_PROPERTY:
                found.append(f"{case.get('classname', '')}::{case.get('name', '')}: {prop.get('value', '')}")
    return found


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="pytest --junitxml output")
    parser.add_argument("what", choices=("counts", "figures"))
    args = parser.parse_args(argv)
    try:
        root = ET.parse(args.report).getroot()
    except (OSError, ET.ParseError) as error:
        print(f"junit_summary: cannot read {args.report}: {error}", file=sys.stderr)
        return 2
    if args.what == "counts":
        c = counts(root)
        print(f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped")
    else:
        for line in figures(root):
            print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
