"""The repository's promises: CI runs the README's test command verbatim, and the README's commands exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"## The two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_the_two_commands():
    main_job, tests = readme_commands()
    assert main_job.endswith("kdkernels demo")
    assert "pytest python_tests benchmarks" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    _, tests = readme_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines, "the test command in .ci/run differs from README.md's"


def test_readme_quotes_only_committed_benchmark_results():
    readme = (ROOT / "README.md").read_text()
    quoted = re.findall(r"\(benchmarks/results/([^)]+\.(?:md|json))\)", readme)
    assert quoted, "the README's benchmark table names its source file"
    for path in quoted:
        assert (ROOT / "benchmarks" / "results" / path).is_file(), path


def test_readme_lists_every_registered_method():
    from kdkernels.distill import list_methods

    section = re.search(r"\*\*The methods\*\*(.*?)<!-- demo-results -->", (ROOT / "README.md").read_text(), re.S)
    listed = set(re.findall(r"^\| `([a-z0-9+-]+)` \| ", section.group(1), re.M))
    assert listed == {m.name for m in list_methods()}


def test_readme_toolkit_examples_run():
    """The README's distillation examples, run as written (one epoch; the digits zoo's stage3 for "layer3")."""
    from kdkernels import distill

    section = (ROOT / "README.md").read_text()
    section = section[section.index("## Distillation toolkit"):section.index("**The commands.**")]
    training, custom = re.findall(r"```python\n(.*?)```", section, re.S)
    assert "epochs=240" in training and "layer3" in custom
    namespace = {"student": distill.digits_model("student-cnn"), "teacher": distill.digits_model("teacher-cnn")}
    exec(training.replace("epochs=240", "epochs=1").replace('out_dir="runs/dkd"', "progress=False"), namespace)
    assert 0.0 <= namespace["result"].accuracy <= 100.0
    assert namespace["recipe"].hyperparameters["warmup"] == 5
    exec(custom.replace("layer3", "stage3"), namespace)
    assert [term.name for term in namespace["distiller"].terms] == ["ce_student", "kd", "at"]


def test_readme_views_example_runs():
    """The README's views example, run as written for one epoch: the student reads the low-resolution view."""
    from kdkernels import distill

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Views and per-model inputs.**"):readme.index("**Moving-average and snapshot")]
    (example,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace = {"student": distill.digits_model("student-cnn"), "teacher": distill.digits_model("teacher-cnn"),
                 "distill": distill, "kdkernels": __import__("kdkernels")}
    exec(example, namespace)
    assert namespace["distiller"].inputs == {"student": "input_low", "teacher": "input"}
    split = distill.load_digits(train_size=64)
    result = distill.Trainer(distill.TrainConfig(epochs=1, batch_size=32, progress=False)).fit(
        namespace["recipe"], split.train, split.test)
    assert 0.0 <= result.accuracy <= 100.0


def test_readme_loss_table_names_every_loss_its_module_and_file():
    import kdkernels
    from kdkernels.nn import LOSS_MODULES

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("<!-- losses-table -->"):readme.index("## Distillation toolkit")]
    rows = [line.split("|")[1:4] for line in table.splitlines() if line.startswith("| `")]
    listed = {}
    for functions, modules, file in rows:
        names = re.findall(r"`([a-z0-9_]+)`", functions)
        classes = re.findall(r"`([A-Za-z0-9]+)`", modules)
        for name, cls in zip(names, classes):
            listed[name] = (cls, file.strip().strip("`"))
    assert set(listed) == set(LOSS_MODULES)
    for name, (cls, file) in listed.items():
        assert LOSS_MODULES[name].__name__ == cls, name
        assert getattr(kdkernels, name).__module__ == f"kdkernels.losses.{file.removesuffix('.py')}", name


def test_readme_method_count_is_the_registry_s():
    from kdkernels.distill import list_methods

    count = len([m for m in list_methods() if m.name != "ce"])
    readme = (ROOT / "README.md").read_text()
    quoted = re.findall(r"(\d+) (?:distillation )?methods", readme)
    assert quoted and all(int(n) == count for n in quoted), (quoted, count)
