# SPDX-License-Identifier: Apache-2.0
"""schemathesis hooks for scripts/api-conformance.sh (loaded through SCHEMATHESIS_HOOKS).

1. Host paths stay in the scratch directory. Generated bodies carry host paths (a log file,
   a kernel, a snapshot); ember opens or creates what they name, so each such non-empty
   string is confined to the run's scratch directory ($EMBER_CONFORM_SCRATCH): "/" becomes
   "_" and the name, with a "p" in front (so ".." stays a plain name), goes under it. Empty
   strings stay empty (ember must refuse them). Types are left alone, so negative cases stay
   negative.

2. Two reports are not non-conformances, and are dropped (counted on stderr at the end):
   - ST201 (a schema-violating request accepted) where every violation is a JSON null given
     for an optional field, or a field a partial update leaves out. ember, like Firecracker
     (serde's Option), takes null as "not given"; Firecracker's own GET /vm/config and
     config files carry such nulls ("initrd_path": null), so refusing them would break
     documents Firecracker accepts. A null for a required field is still refused, and still
     checked. PATCH /machine-config without vcpu_count or mem_size_mib: see PARTIAL below.
   - ST104 (no Content-Type) on a 204 No Content: there is no body to type (RFC 9110 15.3.5),
     and Firecracker sends none either; schemathesis applies the swagger file's global
     `produces` to every response, bodiless ones included.
"""
import atexit
import collections
import os
import sys

import schemathesis

SCRATCH = os.environ["EMBER_CONFORM_SCRATCH"]
PATH_KEYS = {
    "kernel_image_path", "initrd_path", "path_on_host", "socket", "log_path",
    "metrics_path", "uds_path", "snapshot_path", "mem_file_path", "backend_path",
    "serial_out_path",
}


def confine(value):
    if isinstance(value, dict):
        return {
            k: (os.path.join(SCRATCH, "p" + v.replace("/", "_"))
                if k in PATH_KEYS and isinstance(v, str) and v else confine(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [confine(v) for v in value]
    return value


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    case.body = confine(case.body)


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# PATCH /machine-config is a partial update (Firecracker's MachineConfigUpdate: every field
# optional), but the swagger file gives it the PUT schema, whose vcpu_count and mem_size_mib
# are required. A PATCH body is checked as the whole configuration it makes from the defaults.
PARTIAL = {("PATCH", "/machine-config"): {"vcpu_count": 1, "mem_size_mib": 128}}


def _valid_as_ember_reads_it(case):
    """Whether the body, read as ember (and Firecracker) reads it, is valid for the schema:
    every null-valued field left out ("null means not given"), and a partial PATCH completed
    from the defaults. A null for a required field leaves the body without it, which the
    schema refuses: such a failure is kept. So is any case this reading does not change."""
    body = _without_nulls(case.body)
    base = PARTIAL.get((case.operation.method.upper(), case.operation.path))
    if base is not None and isinstance(body, dict):
        body = {**base, **body}
    if body == case.body or not case.operation.body:
        return False
    return any(b.is_valid(body) for b in case.operation.body)


DROPPED = collections.Counter()


def _note(kind, case):
    DROPPED[(kind, case.operation.label)] += 1


@atexit.register
def _report():
    for (kind, operation), n in sorted(DROPPED.items()):
        print(f"conformance hooks: {n} report(s) on {operation} not failures: {kind}",
              file=sys.stderr)


@schemathesis.hook
def filter_failure(ctx, failure, case, response):
    if failure.code == "ST201" and response.status_code < 300 and _valid_as_ember_reads_it(case):
        _note("null-for-optional or partial PATCH", case)
        return False
    if failure.code == "ST104" and response.status_code == 204 and not response.content:
        _note("no-content-type-on-204", case)
        return False
    return True

