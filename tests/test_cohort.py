"""Cohort manifest loading and validation."""

from __future__ import annotations

import pytest

from slidemil.cohort import SlideRecord, load_cohort, row_problem, sort_class_names
from slidemil.errors import CohortError


def _csv(tmp_path, text: str, name="cohort.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def slide_files(tmp_path):
    (tmp_path / "slides").mkdir()
    for name in ("a.svs", "b.svs", "c.svs"):
        (tmp_path / "slides" / name).write_bytes(b"x")
    return tmp_path


def test_relative_paths_resolve_against_the_csv_folder(slide_files):
    path = _csv(
        slide_files,
        "slide_id,path,label,patient_id\nA,slides/a.svs,tumour,p1\nB,slides/b.svs,normal,p1\n",
    )
    cohort = load_cohort(path)
    assert cohort["A"].path == (slide_files / "slides" / "a.svs").resolve()
    assert cohort.class_names == ("normal", "tumour")
    assert cohort.label_index(cohort["A"]) == 1
    assert len(cohort) == 2 and "B" in cohort


def test_every_problem_is_reported_at_once_with_its_line(slide_files):
    path = _csv(
        slide_files,
        "slide_id,path,label,patient_id,split\n"
        "A,slides/a.svs,x,p1,train\n"
        "A,slides/b.svs,y,p2,\n"  # duplicate id
        "C,slides/missing.svs,y,p3,\n"  # missing file
        "D,slides/c.svs,,p4,\n"  # empty label
        "E,slides/c.svs,y,p5,holdout\n",  # bad split
    )
    with pytest.raises(CohortError) as info:
        load_cohort(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "4 problem(s)" in message
    for expected in (
        "line 3: duplicate slide_id",
        "line 4: slide " + str(slide_files / "slides" / "missing.svs") + ": file not found",
        "line 5: empty label",
        "line 6: split 'holdout'",
    ):
        assert expected in message


def test_missing_columns_are_named(slide_files):
    path = _csv(slide_files, "id,file\nA,slides/a.svs\n")
    with pytest.raises(
        CohortError, match="missing column\\(s\\) slide_id, path, label, patient_id"
    ):
        load_cohort(path)


def test_prediction_cohort_needs_no_labels(slide_files):
    path = _csv(slide_files, "slide_id,path\nA,slides/a.svs\n")
    cohort = load_cohort(path, require_labels=False)
    assert not cohort.has_labels
    assert cohort["A"].patient_id == "A"


def test_unsafe_slide_ids_and_bad_mpp_are_refused(slide_files):
    path = _csv(
        slide_files,
        "slide_id,path,label,patient_id,slide_mpp\n"
        "../evil,slides/a.svs,x,p1,\n"
        "B,slides/b.svs,x,p2,-1\n",
    )
    with pytest.raises(CohortError) as info:
        load_cohort(path)
    assert "must be letters" in str(info.value) and "slide_mpp '-1'" in str(info.value)


def test_slide_mpp_and_masks_are_read(slide_files):
    (slide_files / "mask.png").write_bytes(b"x")
    path = _csv(
        slide_files,
        "slide_id,path,label,patient_id,slide_mpp,mask_path\nA,slides/a.svs,x,p1,0.25,mask.png\n",
    )
    record = load_cohort(path)["A"]
    assert record.slide_mpp == 0.25
    assert record.mask_path == (slide_files / "mask.png").resolve()


def test_fixed_class_order_rejects_unknown_labels(slide_files):
    path = _csv(slide_files, "slide_id,path,label,patient_id\nA,slides/a.svs,z,p1\n")
    with pytest.raises(CohortError, match="not among the classes"):
        load_cohort(path, class_names=("x", "y"))


def test_not_a_csv(tmp_path):
    with pytest.raises(CohortError, match="file not found"):
        load_cohort(tmp_path / "nope.csv")
    with pytest.raises(CohortError, match="is a directory"):
        load_cohort(tmp_path)


def test_numeric_labels_sort_numerically():
    assert sort_class_names(["10", "2", "1"]) == ("1", "2", "10")
    assert sort_class_names(["b", "a"]) == ("a", "b")


def test_save_round_trips(slide_files, tmp_path):
    path = _csv(slide_files, "slide_id,path,label,patient_id\nA,slides/a.svs,x,p1\n")
    cohort = load_cohort(path)
    cohort.save(tmp_path / "out" / "manifest.csv")
    again = load_cohort(tmp_path / "out" / "manifest.csv")
    assert again.slides == cohort.slides


def test_bad_files_are_rows_with_reasons_not_cohort_errors(slide_files):
    slides = slide_files / "slides"
    (slides / "folder.svs").mkdir()
    (slides / "empty.svs").write_bytes(b"")
    path = _csv(
        slide_files,
        "slide_id,path,mask_path\nA,slides/a.svs,\nB,slides/gone.svs,\nC,slides/folder.svs,\n"
        "D,slides/empty.svs,\nE,slides/b.svs,masks/none.png\n",
    )
    cohort = load_cohort(path, require_labels=False, check_files=False)  # what the stages do
    reasons = {r.slide_id: getattr(row_problem(r), "reason", None) for r in cohort}
    assert reasons == {
        "A": None, "B": "slide_missing", "C": "not_a_file", "D": "empty_file", "E": "mask_missing",
    }  # fmt: skip
    with pytest.raises(CohortError, match="4 problem"):
        load_cohort(path, require_labels=False)  # check_files=True keeps them cohort errors


def test_strict_row_check_opens_the_slide(slide_files):
    record = SlideRecord("A", slide_files / "slides" / "a.svs")  # 1 byte: no slide format
    assert row_problem(record) is None  # the cheap check only looks at the file
    assert row_problem(record, open_slide=True).reason == "unreadable_slide"


def test_an_optional_site_column_is_read_kept_and_saved(slide_files, tmp_path):
    path = _csv(
        slide_files,
        "slide_id,path,label,patient_id,site\n"
        "A,slides/a.svs,x,p1, Hospital A \nB,slides/b.svs,y,p2,\nC,slides/c.svs,y,p3,hospital-b\n",
    )
    cohort = load_cohort(path)
    assert [r.site for r in cohort] == ["Hospital A", None, "hospital-b"]
    assert cohort.has_sites
    cohort.save(tmp_path / "manifest.csv")
    assert load_cohort(tmp_path / "manifest.csv").slides == cohort.slides
    plain = load_cohort(_csv(slide_files, "slide_id,path,label,patient_id\nA,slides/a.svs,x,p1\n"))
    assert not plain.has_sites and plain["A"].site is None


def test_spreadsheet_exports_are_read_as_written(slide_files):
    """Excel's "CSV UTF-8": a byte-order mark, CRLF line ends, quoted cells with commas, a
    blank line and spaces after the commas; the line numbers of problems stay the file's."""
    text = (
        "\ufeffslide_id, path,label,patient_id\r\n"
        'A, slides/a.svs,"tumour, grade 2",p1\r\n'
        "\r\n"
        "B,slides/b.svs,normal,p2\r\n"
        "C,slides/c.svs,,p3\r\n"
    )
    path = slide_files / "excel.csv"
    path.write_bytes(text.encode("utf-8"))
    with pytest.raises(CohortError, match="line 5: empty label"):
        load_cohort(path)
    path.write_bytes(text.replace("C,slides/c.svs,,p3", "C,slides/c.svs,normal,p3").encode())
    cohort = load_cohort(path)
    assert [r.slide_id for r in cohort] == ["A", "B", "C"]
    assert cohort["A"].label == "tumour, grade 2"
    assert cohort["A"].path == (slide_files / "slides" / "a.svs").resolve()


def test_a_row_with_too_many_cells_is_named(slide_files):
    path = _csv(slide_files, "slide_id,path,label,patient_id\nA,slides/a.svs,x,p1\nB,b,y,p2,9\n")
    with pytest.raises(CohortError, match="line 3 has 5 fields, the header 4"):
        load_cohort(path)


def test_short_rows_read_as_blank_cells_and_a_twice_named_column_is_refused(slide_files):
    path = _csv(slide_files, "slide_id,path,label,patient_id,site\nA,slides/a.svs,x,p1\n")
    assert load_cohort(path)["A"].site is None
    path = _csv(slide_files, "slide_id,path,label,label,patient_id\nA,slides/a.svs,x,y,p1\n")
    with pytest.raises(CohortError, match="label appear twice"):
        load_cohort(path)
    with pytest.raises(CohortError, match="no header"):
        load_cohort(_csv(slide_files, ""))
    with pytest.raises(CohortError, match="not a readable CSV"):
        (slide_files / "latin1.csv").write_bytes(
            "slide_id,path\nA,slides/\xe9.svs\n".encode("latin-1")
        )
        load_cohort(slide_files / "latin1.csv", require_labels=False)
