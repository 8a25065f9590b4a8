"""Built-in tasks: deterministic, disjoint splits, correct answers, scoring, and the registry."""

from __future__ import annotations

import datetime

import pytest

from fusedtune.trainer.errors import DataError
from fusedtune.trainer.tasks import TASKS, DatesTask, Task, get_task, question_of, register


def _iso_from_question(question: str) -> str:
    """An independent oracle: parse the spelled-out date with datetime."""
    spelled = question.removeprefix("Write the date ").removesuffix(" in YYYY-MM-DD format.")
    return datetime.datetime.strptime(spelled, "%B %d, %Y").strftime("%Y-%m-%d")


def test_dates_rows_are_messages_with_the_right_answer():
    rows = get_task("dates").generate(200, seed=0)
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == row["answer"] == _iso_from_question(user["content"])
    assert len({question_of(r) for r in rows}) == 200


def test_generate_is_deterministic_per_seed():
    task = get_task("dates")
    assert task.generate(50, seed=3) == task.generate(50, seed=3)
    assert task.generate(50, seed=3) != task.generate(50, seed=4)
    assert task.generate(10, seed=3) == task.generate(50, seed=3)[:10]


def test_split_is_disjoint_and_sized():
    train, held_out = get_task("dates").split(num_train=2000, num_eval=300, seed=0)
    assert len(train) == 2000 and len(held_out) == 300
    train_answers = {r["answer"] for r in train}
    assert len(train_answers) == 2000
    assert train_answers.isdisjoint(r["answer"] for r in held_out)
    assert get_task("dates").split(2000, 300, seed=0) == (train, held_out)


def test_exclude_and_capacity():
    task = DatesTask()
    days = (datetime.date(task.last_year + 1, 1, 1) - datetime.date(task.first_year, 1, 1)).days
    assert task.capacity == days
    exclude = {question_of(r) for r in task.generate(5, seed=1)}
    assert exclude.isdisjoint(question_of(r) for r in task.generate(100, seed=1, exclude=exclude))
    with pytest.raises(DataError, match=rf"^data\.task: the dates task has only {days} distinct questions, "):
        task.generate(days + 1, seed=0)
    # split names the field that asked for too many (not data.task)
    with pytest.raises(
        DataError,
        match=rf"^data\.num_train: the dates task has only {days - 3} distinct questions after the 3 held out, "
        rf"asked for {days}$",
    ):
        task.split(num_train=days, num_eval=3, seed=0)
    with pytest.raises(DataError, match=r"^data\.num_eval: "):
        task.split(num_train=1, num_eval=days + 1, seed=0)


@pytest.mark.parametrize(
    ("completion", "correct"),
    [
        ("2024-03-05", True),
        ("  2024-03-05\n", True),
        ("2024-03-05.", True),
        ("2024-03-05 is the date", True),
        ("2024-03-051", False),
        ("2024-03-05-01", False),  # a longer date-like token
        ("2024-03-05.5", False),
        ("2024-03-05: done", True),
        ("2024-03-06", False),
        ("2024-3-5", False),
        ("March 5, 2024", False),
        ("The answer is 2024-03-05", False),
        ("", False),
    ],
)
def test_score(completion, correct):
    task = get_task("dates")
    row = task.row("Write the date March 5, 2024 in YYYY-MM-DD format.", "2024-03-05")
    assert task.score(row, completion) is correct


def test_unknown_task_and_one_class_extension():
    with pytest.raises(DataError, match=r"^data\.task: unknown task 'nope' \(known: .*dates"):
        get_task("nope")

    @register
    class Echo(Task):
        name = "echo-test"
        capacity = 10

        def sample(self, rng):
            word = str(rng.randrange(10))
            return f"Repeat {word}", word

    try:
        task = get_task("echo-test")
        train, held_out = task.split(7, 3, seed=0)
        assert {r["answer"] for r in train}.isdisjoint(r["answer"] for r in held_out)
        assert task.score(train[0], train[0]["answer"])
    finally:
        del TASKS["echo-test"]
