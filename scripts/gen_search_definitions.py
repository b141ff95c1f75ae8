#!/usr/bin/env python3
"""Copies what the search engine needs from the R4 definitions into the project (it never
reads ../shared at run time): src/search/search-parameters.json, the 1,375 R4
SearchParameters reduced to the fields the engine reads, and
src/search/compartment-patient.json, the Patient CompartmentDefinition as
{resource type: [search parameters that link it to the patient]}.

Usage: python3 scripts/gen_search_definitions.py [../shared/fhir-r4-examples]
"""
import json
import sys

src = (sys.argv[1] if len(sys.argv) > 1 else "../shared/fhir-r4-examples").rstrip("/") + "/"
bundle = json.load(open(src + "search-parameters.json"))
keep = ("url", "code", "base", "type", "expression", "target", "component", "multipleOr",
        "multipleAnd", "comparator", "modifier", "chain", "xpathUsage")
out = []
for entry in bundle["entry"]:
    r = entry["resource"]
    d = {k: r[k] for k in keep if k in r}
    if "component" in d:
        d["component"] = [{"definition": c["definition"], "expression": c["expression"]} for c in d["component"]]
    out.append(d)
text = json.dumps(out, separators=(",", ":")).replace('},{"url"', '},\n{"url"')
open("src/search/search-parameters.json", "w").write(text + "\n")
c = json.load(open(src + "compartmentdefinition-patient.json"))
compartment = {r["code"]: r.get("param", []) for r in c["resource"]}
doc = {"url": c["url"], "code": c["code"], "resource": compartment}
open("src/search/compartment-patient.json", "w").write(json.dumps(doc, indent=0, separators=(",", ":")) + "\n")
