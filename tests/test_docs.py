"""The README documents every recipe key (generated) and holds the CI test command."""

from pathlib import Path

from mmpeft.docs import END, START, recipe_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_recipe_reference_in_sync():
    text = README.read_text()
    block = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == recipe_reference().strip(), "run: python -m mmpeft.docs --write README.md"


def test_every_method_and_fusion_documented():
    from mmpeft.fusion import FUSIONS
    from mmpeft.methods import METHODS

    text = README.read_text()
    for name in METHODS.names():
        assert f"| `{name}`" in text, name
    for name in FUSIONS.names():
        assert f"| `{name}`" in text, name


def test_readme_has_ci_test_command():
    text = README.read_text()
    after = text.split("<!-- ci:test -->", 1)[1]
    command = after.split("```bash", 1)[1].split("```", 1)[0]
    assert "pip install torch==2.13.0" in command and "pytest" in command
