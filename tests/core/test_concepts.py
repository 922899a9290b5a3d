import pytest

from driftscope_core.concepts import BUILTIN_LISTS, load_concept_list, load_stopwords

EXPECTED_COUNTS = {"cifar10": 10, "cifar100": 100, "coco80": 80, "imagenet1k": 1000}


def test_builtin_lists_are_the_expected_ones():
    assert set(BUILTIN_LISTS) == set(EXPECTED_COUNTS)


@pytest.mark.parametrize("name", BUILTIN_LISTS)
def test_counts_and_no_empty_entries(name):
    names = load_concept_list(name)
    assert len(names) == EXPECTED_COUNTS[name]
    assert all(n and n == n.strip() for n in names)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "coco80"])
def test_no_duplicates(name):
    names = load_concept_list(name)
    assert len(set(names)) == len(names)


def test_known_entries():
    assert load_concept_list("cifar10")[0] == "airplane"
    cifar100 = load_concept_list("cifar100")
    assert "aquarium fish" in cifar100 and "maple tree" in cifar100
    assert not any("_" in n for n in cifar100)
    assert load_concept_list("coco80")[0] == "person"
    assert load_concept_list("imagenet1k")[0] == "tench"


def test_data_files_have_no_blank_lines_and_end_with_newline():
    from pathlib import Path

    import driftscope_core.concepts as concepts

    data = Path(concepts.__file__).parent / "data"
    for name in (*BUILTIN_LISTS, "stopwords"):
        text = (data / f"{name}.txt").read_text(encoding="utf-8")
        assert text.endswith("\n") and not text.endswith("\n\n")
        assert "" not in text[:-1].split("\n")


def test_unknown_name_raises_with_valid_choices():
    with pytest.raises(ValueError) as info:
        load_concept_list("cifar1000")
    message = str(info.value)
    assert "cifar1000" in message
    assert all(name in message for name in BUILTIN_LISTS)


def test_stopwords():
    words = load_stopwords()
    assert isinstance(words, frozenset)
    assert "the" in words and "and" in words
    assert "dog" not in words
    assert all(w == w.lower() and w == w.strip() and w for w in words)
    assert 100 <= len(words) <= 250
