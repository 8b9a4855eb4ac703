"""Parses Prometheus text exposition from stdin with Prometheus's own Python parser and prints
every sample as JSON: [{"family", "type", "name", "labels", "value"}]. A text the parser
refuses fails (exit 1) with its error."""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families

out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"family": family.name, "type": family.type, "name": s.name,
                    "labels": s.labels, "value": s.value})
print(json.dumps(out))
