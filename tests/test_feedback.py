"""What the annotator reports after a click, and the committed objects' colours (no Qt)."""

import numpy as np

from napari_robustmedsam.annotation.feedback import COMMITTED_COLORS, CURRENT_COLOR, describe_change, is_brownish


def test_describe_change_says_what_a_click_added_removed_or_left_alone():
    before = np.zeros((8, 8), bool)
    before[2:5, 2:5] = True
    after = before.copy()
    after[5, 2:5] = True  # +3
    after[2, 2] = False  # -1
    assert describe_change(before, after) == "11 px (+3 px / -1 px)"
    assert describe_change(None, after) == "11 px"
    assert "unchanged by this prompt" in describe_change(before, before.copy())
    grown = before.copy()
    grown[6, 6] = True
    assert describe_change(before, grown) == "10 px (+1 px)"


def test_committed_colours_are_distinct_bright_and_not_brown():
    assert len(set(COMMITTED_COLORS)) == len(COMMITTED_COLORS) >= 6
    assert CURRENT_COLOR not in COMMITTED_COLORS
    assert not any(is_brownish(c) for c in COMMITTED_COLORS)
    # the check itself recognises brown and dark red
    assert is_brownish("#8b4513") and is_brownish("#a0522d") and is_brownish("#7a1f1f")


def test_commit_status_says_whether_a_piece_was_added_to_an_existing_object():
    from napari_robustmedsam.annotation.feedback import describe_commit
    from napari_robustmedsam.annotation.session import CommitResult

    assert describe_commit(CommitResult(3, 120, 0, 120, 1)) == "Committed object 3 (120 px). U undoes."
    added = describe_commit(CommitResult(1, 506, 4, 42, 5))
    assert added == ("Added 42 px to object 1 (now 506 px from 5 commits); 4 px already belonged to other objects "
                     "and were kept. U undoes.")
    # a correction of an object started from its label replaces it: the plain wording
    assert describe_commit(CommitResult(1, 480, 0, 10, 2, correction=True)).startswith("Committed object 1 (480 px)")


def test_the_status_after_undo_says_what_was_taken_back():
    from napari_robustmedsam.annotation.feedback import describe_undo

    assert describe_undo(None, None) == "Nothing to undo."
    assert describe_undo("commit", 3) == "Undid the commit of object 3."
    assert describe_undo("remove", 3) == "Brought back object 3."
    assert "objects committed before it are back" in describe_undo("replace", 0)
