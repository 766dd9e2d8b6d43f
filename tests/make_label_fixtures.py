"""Write tests/fixtures/gpts-are-gpts/: a small subset of the "GPTs are GPTs" release (openai/GPTs-are-GPTs,
data/, MIT; task statements from O*NET, USDOL/ETA, CC BY 4.0) for tests/test_label.py.

    python tests/make_label_fixtures.py [--data ../shared/data/gpts-are-gpts]

Keeps every 50th labelled occupation (by code) plus four chosen for the crosswalk (one counted under its
OEWS broad group, one that OEWS lacks, two sharing one SOC code) with all their tasks and their rows of
occ_level.csv, every 60th unlabelled occupation's tasks, and the OEWS rows of their SOC codes. Lines are
copied unchanged.
"""
import argparse
import csv
from pathlib import Path

OUT = Path(__file__).resolve().parent / "fixtures" / "gpts-are-gpts"
CHOSEN = {"13-1021.00", "53-1042.00", "11-3013.00", "11-3013.01"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/gpts-are-gpts"))
    src = Path(ap.parse_args().data)
    lines = {f: (src / f).read_text(encoding="utf-8").splitlines(keepends=True)
             for f in ("full_labelset.tsv", "full_onet_data.tsv", "occ_level.csv", "national_May2021_dl.csv")}
    soc = lambda line: line.split("\t")[1]  # noqa: E731
    labelled = sorted({soc(l) for l in lines["full_labelset.tsv"][1:]})
    others = sorted({soc(l) for l in lines["full_onet_data.tsv"][1:]} - set(labelled))
    keep_l = set(labelled[::50]) | (CHOSEN & set(labelled))
    keep = keep_l | set(others[::60])
    OUT.mkdir(parents=True, exist_ok=True)
    for f, socs in (("full_labelset.tsv", keep_l), ("full_onet_data.tsv", keep)):
        (OUT / f).write_text(lines[f][0] + "".join(l for l in lines[f][1:] if soc(l) in socs), encoding="utf-8")
    occ = lines["occ_level.csv"]
    (OUT / "occ_level.csv").write_text(occ[0] + "".join(l for l in occ[1:] if l.split(",")[0] in keep_l),
                                       encoding="utf-8")
    codes = {s[:7] for s in keep} | {s[:6] + "0" for s in keep} | {"00-0000"}
    emp = lines["national_May2021_dl.csv"]
    rows = [l for l in emp[1:] if next(csv.reader([l]))[8] in codes]
    (OUT / "national_May2021_dl.csv").write_text(emp[0] + "".join(rows), encoding="utf-8")
    print(f"{OUT}: {len(keep_l)} labelled + {len(keep) - len(keep_l)} unlabelled occupations, {len(rows)} OEWS rows")


if __name__ == "__main__":
    main()
