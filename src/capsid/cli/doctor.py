"""``capsid doctor IMAGE``: what an image needs against what this host offers for HPC."""

from __future__ import annotations

import json
import sys

from capsid.cli.parser import parser


def run(verb: str, argv: list[str]) -> int:
    p = parser("doctor", "[--json] IMAGE",
               "Check, before a job is queued, whether IMAGE will run well here: its C "
               "library, MPI (implementation, version, ABI), PMIx, CPU ISA level and CUDA "
               "against the host's, and the kernel features capsid uses. Exit status 1 if a check "
               "FAILs.")
    p.add_argument("-j", "--json", action="store_true", help="print the report as JSON")
    p.add_argument("image")
    args = p.parse_args(argv)
    from capsid import doctor

    findings, image, host = doctor.report(args.image)
    if args.json:
        report = doctor.as_json(args.image, findings, image, host)
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        width = max(len(f.check) for f in findings)
        sys.stdout.write(f"{'':6}{'CHECK':<{width}}  IMAGE / HOST\n")
        for f in findings:
            sides = f.host if f.image == "-" else f"{f.image} / {f.host}"
            sys.stdout.write(f"{f.status:<6}{f.check:<{width}}  {sides}\n")
            if f.fix:
                sys.stdout.write(f"{'':6}{'':<{width}}  -> {f.fix}\n")
    return 1 if any(f.status == doctor.FAIL for f in findings) else 0
