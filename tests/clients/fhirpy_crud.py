#!/usr/bin/env python3
"""Black-box CRUD test of a FHIR R4 server driven by fhirpy's sync client, unmodified.

    python fhirpy_crud.py BASE_URL        # e.g. http://127.0.0.1:8080/4_0_0

Exits 0 after printing "fhirpy: N checks passed", or non-zero with "fhirpy: FAILED ..."
naming the step, the failed check and the last HTTP exchange.

Environment (both optional):
    FHIRPY_TRACE=1        print every request/response fhirpy makes
    FHIRPY_URL_ALIASES    comma-separated public base URLs of the same server; fhirpy refuses
                          to follow a Bundle `next` link that does not start with BASE_URL
                          unless the link starts with one of these (the server writes its
                          ROSTER_BASE_URL into links)

What fhirpy 2.3.1 sends (read from fhirpy/base/lib_sync.py, client.py, resource.py), which is
what this test holds the server to:
  * Every request goes through requests.request(method, url, json=data, headers=...), with
    headers {"Accept": "application/fhir+json"} only. `json=` makes requests set
    "Content-Type: application/json" (not application/fhir+json) on every request that has a
    body; GET and DELETE have no body and no Content-Type.
  * fhirpy builds every URL as "{base}/{path}?{query}"; requests drops the "?" when the query
    is empty, so a read goes on the wire as `GET {base}/Patient/{id}`.
  * resource.save(): POST {base}/{type} without id, PUT {base}/{type}/{id} with one; the body is
    the whole resource with nulls and empty lists/dicts dropped. client.resource(...) puts
    "resourceType" LAST in the JSON object (it is added after the keyword arguments).
    The PUT body carries the id and the meta (versionId, lastUpdated) of the last response,
    its keys in the order of that response (only a freshly built resource has resourceType
    last). Since the local object becomes the write response, and roster's Group write
    responses leave `member` out (SUBSETTED), a Group.save() after a save()/patch() of the
    same object would PUT without member and so remove every member: re-read it first.
    The 2xx response body must be the resource: the local object is replaced by it (an
    empty body leaves the local object as it was). Location is not used.
  * resource.patch(**kw): updates the local object, then PATCH {base}/{type}/{id} with a JSON
    object holding only those keys (e.g. {"gender": "male"}), Content-Type application/json:
    merge-patch semantics (RFC 7386) with a plain JSON content type. A None value is sent as
    JSON null (nulls are kept for patch), i.e. "remove this element". The response body
    replaces the local object. client.patch(type, id, **kw) and reference.patch(**kw) send
    the same body; client.patch returns the parsed response body (None if empty), and
    reference.patch needs a body with "resourceType".
  * resource.delete() / client.delete(...): DELETE {base}/{type}/{id}, no body; any 2xx is OK
    (body parsed if present, 204 fine).
  * searchset.get(): adds _count=2 and raises if not exactly one match; fetch()/fetch_all()
    need a Bundle (anything else: InvalidResponse), keep only entries of the searched type
    (an OperationOutcome entry is skipped), and fetch_all() follows link[relation=next].url.
  * Errors: 404 AND 410 both raise fhirpy.base.exceptions.ResourceNotFound (body text as the
    message), so the 410 after delete is checked on the recorded status code; 401
    AuthorizationError, 403 ForbiddenError, 412 MultipleResourcesFound, 304 returns None,
    any other non-2xx OperationOutcome.

HTTP exchanges are recorded with a requests response hook passed through fhirpy's public
`requests_config` argument, which fhirpy hands to requests.request unchanged.
"""

import json
import os
import sys
import traceback
import uuid
from urllib.parse import parse_qs, urlsplit

try:
    import requests
    from fhirpy import SyncFHIRClient
    from fhirpy.base.exceptions import BaseFHIRError, ResourceNotFound
except ImportError as exc:  # pragma: no cover
    print(f"fhirpy: FAILED: cannot import fhirpy/requests ({exc}); run tests/clients/run.sh", file=sys.stderr)
    sys.exit(2)

SYSTEM = "urn:roster:tests:clients:fhirpy"
MAX_PAGED_ITEMS = 200  # bound on the paged _lastUpdated search


class CheckFailed(Exception):
    pass


class Recorder:
    """requests response hook: keeps every exchange fhirpy makes."""

    def __init__(self, trace):
        self.exchanges = []
        self.trace = trace

    def __call__(self, response, *args, **kwargs):
        req = response.request
        body = req.body
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        ex = {
            "method": req.method,
            "url": req.url,
            "content_type": req.headers.get("Content-Type"),
            "accept": req.headers.get("Accept"),
            "body": body,
            "status": response.status_code,
            "location": response.headers.get("Location"),
            "response_content_type": response.headers.get("Content-Type"),
            "response_body": response.text,
        }
        self.exchanges.append(ex)
        if self.trace:
            print(f"  > {ex['method']} {ex['url']}  Content-Type: {ex['content_type']}", file=sys.stderr)
            if body:
                print(f"  > {body}", file=sys.stderr)
            print(f"  < {ex['status']}  Location: {ex['location']}", file=sys.stderr)
            if ex["response_body"]:
                print(f"  < {ex['response_body'][:1000]}", file=sys.stderr)
        return response

    def last(self):
        if not self.exchanges:
            raise CheckFailed("no HTTP request was recorded")
        return self.exchanges[-1]

    def mark(self):
        return len(self.exchanges)

    def since(self, mark):
        return self.exchanges[mark:]


class Checks:
    def __init__(self):
        self.passed = 0
        self.step = "start"

    def ok(self, what, cond, detail=""):
        if not cond:
            raise CheckFailed(f"{what}{': ' + detail if detail else ''}")
        self.passed += 1

    def eq(self, what, actual, expected):
        if actual != expected:
            raise CheckFailed(f"{what}: expected {expected!r}, got {actual!r}")
        self.passed += 1


def plain(value):
    """fhirpy objects (AttrDict, resources, references) as plain JSON values."""
    return json.loads(json.dumps(value))


def version(resource):
    meta = resource.get("meta") or {}
    return meta.get("versionId")


def run(base, c, rec, client):
    base_path = urlsplit(base).path.rstrip("/")

    def path_of(ex):
        return urlsplit(ex["url"]).path

    def query_of(ex):
        return parse_qs(urlsplit(ex["url"]).query)

    def request_json(ex):
        try:
            return json.loads(ex["body"])  # dicts keep the order of the keys as sent
        except (TypeError, ValueError):
            raise CheckFailed(f"{ex['method']} {ex['url']}: request body is not JSON: {ex['body']!r}")

    def expect_exchange(ex, method, path, statuses, content_type=None, body=True):
        what = f"{method} {path}"
        c.eq(f"{what}: method", ex["method"], method)
        c.eq(f"{what}: path", path_of(ex), base_path + path)
        c.ok(f"{what}: status", ex["status"] in statuses,
             f"expected {statuses}, got {ex['status']}: {ex['response_body'][:500]}")
        if content_type is not None:
            c.eq(f"{what}: request Content-Type sent by fhirpy", ex["content_type"], content_type)
        if not body:
            c.ok(f"{what}: fhirpy sends no body", not ex["body"], repr(ex["body"]))

    run_tag = uuid.uuid4().hex

    # ---- create: POST /Patient, body serialized by fhirpy (resourceType last) ----
    c.step = "create Patient (resource.save -> POST)"
    ada = client.resource(
        "Patient",
        identifier=[{"system": SYSTEM, "value": run_tag}],
        name=[{"family": "Lovelace", "given": ["Ada"]}],
        gender="female",
        birthDate="1815-12-10",
    )
    ada.save()
    ex = rec.last()
    expect_exchange(ex, "POST", "/Patient", (201,), content_type="application/json")
    sent = request_json(ex)
    c.eq("create body: fhirpy puts resourceType last", list(sent)[-1], "resourceType")
    pid = ada.id
    c.ok("create: server assigned an id", isinstance(pid, str) and pid, repr(pid))
    c.eq("create: meta.versionId", version(ada), "1")
    c.eq("create: returned gender", ada.get("gender"), "female")
    c.ok("create: Location header names the new resource",
         ex["location"] and f"/Patient/{pid}" in ex["location"], repr(ex["location"]))
    created_at = (ada.get("meta") or {}).get("lastUpdated")
    c.ok("create: meta.lastUpdated", isinstance(created_at, str) and created_at, repr(created_at))

    # ---- read: GET /Patient/{id} and GET /Patient?_id= ----
    c.step = "read Patient (reference.to_resource, search(_id).get)"
    ada = client.reference("Patient", pid).to_resource()
    expect_exchange(rec.last(), "GET", f"/Patient/{pid}", (200,), body=False)
    c.eq("read: id", ada.id, pid)
    c.eq("read: resourceType", ada.resource_type, "Patient")
    c.eq("read: name", plain(ada.get("name")), [{"family": "Lovelace", "given": ["Ada"]}])
    c.eq("read: gender", ada.get("gender"), "female")
    c.eq("read: birthDate", ada.get("birthDate"), "1815-12-10")
    c.eq("read: identifier", plain(ada.get("identifier")), [{"system": SYSTEM, "value": run_tag}])
    c.eq("read: meta.versionId", version(ada), "1")

    got = client.resources("Patient").search(_id=pid).get()
    ex = rec.last()
    expect_exchange(ex, "GET", "/Patient", (200,), body=False)
    c.eq("search(_id).get(): query", query_of(ex), {"_id": [pid], "_count": ["2"]})
    c.eq("search(_id).get(): id", got.id, pid)
    c.eq("search(_id).get(): family", got["name"][0]["family"], "Lovelace")

    # ---- update: PUT /Patient/{id} with the whole resource ----
    c.step = "update Patient (resource.save -> PUT)"
    ada["name"][0]["given"] = ["Ada", "Augusta"]
    ada["active"] = True
    ada.save()
    ex = rec.last()
    expect_exchange(ex, "PUT", f"/Patient/{pid}", (200,), content_type="application/json")
    sent = request_json(ex)
    c.eq("update body: id", sent.get("id"), pid)
    c.eq("update: meta.versionId", version(ada), "2")
    c.eq("update: returned given", plain(ada["name"][0]["given"]), ["Ada", "Augusta"])
    c.eq("update: returned active", ada.get("active"), True)

    # ---- patch: PATCH /Patient/{id} with a JSON object, Content-Type application/json ----
    c.step = "patch Patient (resource.patch(gender='male'))"
    ada.patch(gender="male")
    ex = rec.last()
    expect_exchange(ex, "PATCH", f"/Patient/{pid}", (200,), content_type="application/json")
    c.eq("patch body sent by fhirpy", request_json(ex), {"gender": "male"})
    # fhirpy replaces its local object with this body; without one the checks below would
    # only see what fhirpy set locally.
    c.ok("patch response: a Patient body",
         ex["response_body"].lstrip().startswith("{")
         and json.loads(ex["response_body"]).get("resourceType") == "Patient",
         ex["response_body"][:300])
    c.eq("patch: returned gender", ada.get("gender"), "male")
    c.eq("patch: returned meta.versionId", version(ada), "3")
    c.eq("patch: other elements kept (given)", plain(ada["name"][0]["given"]), ["Ada", "Augusta"])
    c.eq("patch: other elements kept (active)", ada.get("active"), True)

    ada = client.reference("Patient", pid).to_resource()
    c.eq("read after patch: gender", ada.get("gender"), "male")
    c.eq("read after patch: meta.versionId", version(ada), "3")
    c.eq("read after patch: birthDate untouched", ada.get("birthDate"), "1815-12-10")
    c.eq("read after patch: identifier untouched", plain(ada.get("identifier")),
         [{"system": SYSTEM, "value": run_tag}])

    c.step = "patch Patient (client.patch(birthDate=None): merge-patch null removes)"
    res = client.patch("Patient", pid, birthDate=None)
    ex = rec.last()
    expect_exchange(ex, "PATCH", f"/Patient/{pid}", (200,), content_type="application/json")
    c.eq("patch body sent by fhirpy", request_json(ex), {"birthDate": None})
    c.ok("client.patch returns the resource", isinstance(res, dict), repr(res))
    c.eq("null patch: returned meta.versionId", version(res), "4")
    c.ok("null patch: returned birthDate removed", "birthDate" not in res, repr(res.get("birthDate")))
    c.eq("null patch: returned gender kept", res.get("gender"), "male")
    ada = client.reference("Patient", pid).to_resource()
    c.ok("read after null patch: birthDate removed", "birthDate" not in ada, repr(ada.get("birthDate")))
    c.eq("read after null patch: gender", ada.get("gender"), "male")
    c.eq("read after null patch: meta.versionId", version(ada), "4")

    c.step = "patch Patient (reference.patch(active=False))"
    patched = client.reference("Patient", pid).patch(active=False)
    expect_exchange(rec.last(), "PATCH", f"/Patient/{pid}", (200,), content_type="application/json")
    c.eq("reference.patch: returned id", patched.id, pid)
    c.eq("reference.patch: returned active", patched.get("active"), False)
    c.eq("reference.patch: returned meta.versionId", version(patched), "5")

    # ---- search ----
    c.step = "search Patient (_id, identifier, _lastUpdated)"
    found = client.resources("Patient").search(_id=pid).fetch_all()
    c.eq("search _id fetch_all: ids", [r.id for r in found], [pid])
    c.eq("search _id fetch_all: version", version(found[0]), "5")
    found = client.resources("Patient").search(_id=pid).fetch()
    c.eq("search _id fetch: ids", [r.id for r in found], [pid])

    found = client.resources("Patient").search(identifier=f"{SYSTEM}|{run_tag}").fetch()
    c.eq("search identifier=system|value: ids", [r.id for r in found], [pid])

    found = client.resources("Patient").search(_id=pid, _lastUpdated__ge="2000-01-01").fetch()
    ex = rec.last()
    c.eq("search _lastUpdated__ge: query param", query_of(ex).get("_lastUpdated"), ["ge2000-01-01"])
    c.eq("search _id + _lastUpdated=ge2000-01-01: ids", [r.id for r in found], [pid])
    found = client.resources("Patient").search(_id=pid, _lastUpdated__lt="2000-01-01").fetch()
    c.eq("search _id + _lastUpdated=lt2000-01-01: ids", [r.id for r in found], [])

    c.step = "search Patient (_lastUpdated ge, _sort, _count=1, following next links)"
    babbage = client.resource("Patient", name=[{"family": "Babbage", "given": ["Charles"]}], gender="male")
    babbage.save()
    expect_exchange(rec.last(), "POST", "/Patient", (201,), content_type="application/json")
    bid = babbage.id
    mark = rec.mark()
    seen = []
    searchset = (client.resources("Patient")
                 .search(_lastUpdated__ge=created_at).sort("_lastUpdated").limit(1))
    for resource in searchset:  # what fetch_all() does, bounded
        seen.append(resource.id)
        if (pid in seen and bid in seen) or len(seen) >= MAX_PAGED_ITEMS:
            break
    requests_made = rec.since(mark)
    c.ok("paged search: Ada found", pid in seen, f"first {len(seen)} ids: {seen[:20]}")
    c.ok("paged search: Babbage found", bid in seen, f"first {len(seen)} ids: {seen[:20]}")
    c.ok("paged search: no id twice", len(seen) == len(set(seen)), repr(seen[:50]))
    c.ok("paged search: fhirpy followed next links (>= 2 pages)", len(requests_made) >= 2,
         f"{len(requests_made)} request(s)")
    c.ok("paged search: every page 200", all(e["status"] == 200 for e in requests_made),
         repr([e["status"] for e in requests_made]))

    # ---- Group with a member ----
    c.step = "create Group (resource.save -> POST with member)"
    group = client.resource(
        "Group",
        identifier=[{"system": SYSTEM, "value": run_tag}],
        type="person",
        actual=True,
        member=[{"entity": client.reference("Patient", pid)}],
    )
    group.save()
    ex = rec.last()
    expect_exchange(ex, "POST", "/Group", (201,), content_type="application/json")
    c.eq("group create body: member as fhirpy serialized it", request_json(ex).get("member"),
         [{"entity": {"reference": f"Patient/{pid}"}}])
    c.eq("group create body: resourceType last", list(request_json(ex))[-1], "resourceType")
    gid = group.id
    c.ok("group create: id", isinstance(gid, str) and gid, repr(gid))
    c.eq("group create: meta.versionId", version(group), "1")

    c.step = "read Group"
    g = client.reference("Group", gid).to_resource()
    expect_exchange(rec.last(), "GET", f"/Group/{gid}", (200,), body=False)
    c.eq("group read: type", g.get("type"), "person")
    c.eq("group read: actual", g.get("actual"), True)
    c.eq("group read: member entities", [m["entity"]["reference"] for m in g.get("member", [])],
         [f"Patient/{pid}"])

    c.step = "patch Group (resource.patch(name=...))"
    g.patch(name="fhirpy cohort")
    ex = rec.last()
    expect_exchange(ex, "PATCH", f"/Group/{gid}", (200,), content_type="application/json")
    c.eq("group patch body sent by fhirpy", request_json(ex), {"name": "fhirpy cohort"})
    c.eq("group patch: returned name", g.get("name"), "fhirpy cohort")
    c.eq("group patch: returned meta.versionId", version(g), "2")
    g = client.reference("Group", gid).to_resource()
    c.eq("group read after patch: name", g.get("name"), "fhirpy cohort")
    c.eq("group read after patch: member still there",
         [m["entity"]["reference"] for m in g.get("member", [])], [f"Patient/{pid}"])
    c.eq("group read after patch: type", g.get("type"), "person")
    found = client.resources("Group").search(identifier=f"{SYSTEM}|{run_tag}").fetch()
    c.eq("group search identifier: ids", [r.id for r in found], [gid])

    # ---- delete ----
    c.step = "delete Patient (resource.delete -> DELETE)"
    ada.delete()
    expect_exchange(rec.last(), "DELETE", f"/Patient/{pid}", (200, 202, 204), body=False)
    try:
        client.reference("Patient", pid).to_resource()
    except ResourceNotFound:
        # fhirpy raises ResourceNotFound for 404 and 410 alike: the status tells them apart.
        expect_exchange(rec.last(), "GET", f"/Patient/{pid}", (410,), body=False)
    else:
        raise CheckFailed(f"read of deleted Patient/{pid} succeeded (expected 410 Gone)")
    found = client.resources("Patient").search(_id=pid).fetch()
    c.eq("search _id after delete: ids", [r.id for r in found], [])

    c.step = "delete Group and Babbage (client.delete)"
    client.delete("Group", gid)
    expect_exchange(rec.last(), "DELETE", f"/Group/{gid}", (200, 202, 204), body=False)
    try:
        client.get("Group", gid)
    except ResourceNotFound:
        expect_exchange(rec.last(), "GET", f"/Group/{gid}", (410,), body=False)
    else:
        raise CheckFailed(f"read of deleted Group/{gid} succeeded (expected 410 Gone)")
    client.delete(babbage)
    expect_exchange(rec.last(), "DELETE", f"/Patient/{bid}", (200, 202, 204), body=False)


def main(argv):
    if len(argv) != 2 or not argv[1].startswith(("http://", "https://")):
        print("usage: fhirpy_crud.py BASE_URL   (e.g. http://127.0.0.1:8080/4_0_0)", file=sys.stderr)
        return 2
    base = argv[1].rstrip("/")
    rec = Recorder(trace=os.environ.get("FHIRPY_TRACE") == "1")
    aliases = [a.strip() for a in os.environ.get("FHIRPY_URL_ALIASES", "").split(",") if a.strip()]
    client = SyncFHIRClient(
        base,
        requests_config={"timeout": 30, "hooks": {"response": [rec]}},
        url_aliases=aliases,
    )
    c = Checks()
    try:
        run(base, c, rec, client)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear message
        if isinstance(exc, CheckFailed):
            why = str(exc)
        elif isinstance(exc, BaseFHIRError):
            why = f"fhirpy raised {type(exc).__name__}: {str(exc)[:1500]}"
        elif isinstance(exc, requests.ConnectionError):
            why = f"cannot connect to {base}: {exc}"
        elif isinstance(exc, requests.RequestException):
            why = f"HTTP error: {type(exc).__name__}: {exc}"
        else:
            why = f"unexpected {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            if isinstance(exc, ValueError) and "does not contain base url" in str(exc):
                why += ("\n(hint: the server's links use another base URL; "
                        "set FHIRPY_URL_ALIASES to it or use that URL as BASE_URL)")
        print(f"fhirpy: FAILED in step '{c.step}' after {c.passed} passed checks: {why}", file=sys.stderr)
        if rec.exchanges:
            ex = rec.exchanges[-1]
            print(f"  last exchange: {ex['method']} {ex['url']} (Content-Type {ex['content_type']})"
                  f" -> {ex['status']}", file=sys.stderr)
            if ex["body"]:
                print(f"  request body: {ex['body'][:1000]}", file=sys.stderr)
            print(f"  response body: {ex['response_body'][:1000]}", file=sys.stderr)
        return 1
    print(f"fhirpy: {c.passed} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
