"""Caption and question cleaning, the BLIP way."""
import re

CAPTION_PUNCTUATION = re.compile(r'[!"()*#~]')
QUESTION_PUNCTUATION = re.compile(r'[.!"()*#:;~]')
WHITESPACE_RUN = re.compile(r"\s{2,}")


def truncate_words(text: str, max_words: int) -> str:
    words = text.split(" ")
    return " ".join(words[:max_words])


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Lower-case, `!"()*#~` -> spaces, collapse whitespace runs, strip, keep `max_words` words."""
    caption = CAPTION_PUNCTUATION.sub(" ", caption.lower())
    caption = WHITESPACE_RUN.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    return truncate_words(caption, max_words)


def pre_question(question: str, max_words: int = 50) -> str:
    """Lower-case, remove `.!"()*#:;~`, strip trailing spaces, keep `max_words` words."""
    question = QUESTION_PUNCTUATION.sub("", question.lower())
    question = question.rstrip(" ")
    return truncate_words(question, max_words)

