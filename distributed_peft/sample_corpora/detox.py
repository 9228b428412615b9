"""Template-generated toxic/neutral comment pairs in the style of a detoxification parallel corpus."""

from __future__ import annotations

import random
import re

TARGET_PAIRS = 2000
MIN_WORDS = 6
MAX_WORDS = 30

INSULT_ADJECTIVES = ("stupid", "dumb", "pathetic", "idiotic", "brainless", "moronic", "clueless")
INSULT_NOUNS = ("idiot", "moron", "loser", "clown", "fool", "jerk")
INSULT_PLURALS = {noun: noun + "s" for noun in INSULT_NOUNS}
TRASH_WORDS = ("garbage", "trash", "crap")

TOXIC_WORDS: tuple[str, ...] = (
    *INSULT_ADJECTIVES,
    *INSULT_NOUNS,
    *INSULT_PLURALS.values(),
    *TRASH_WORDS,
    "crappy",
    "damn",
    "shut up",
    "dumbest",
)

TOXIC_WORD_PATTERN = re.compile(r"\b(?:" + "|".join(re.escape(word) for word in TOXIC_WORDS) + r")\b")

DETERMINERS = ("this", "that", "the")
PEOPLE = (
    "guy",
    "author",
    "reviewer",
    "referee",
    "coach",
    "manager",
    "mayor",
    "moderator",
    "commenter",
    "poster",
    "senator",
    "developer",
    "teacher",
    "landlord",
    "neighbor",
    "critic",
    "streamer",
    "player",
    "journalist",
    "admin",
)
PRONOUNS = (("he", "him", "his"), ("she", "her", "her"))
DOCUMENTS = ("article", "docs", "rules", "thread", "manual", "report", "changelog", "faq")

TOPICS_BY_AREA = {
    "politics": (
        "the new tax plan",
        "the election results",
        "the housing policy",
        "the budget proposal",
        "the new parking law",
        "the council vote",
        "the immigration bill",
    ),
    "sports": (
        "the offside rule",
        "last night's game",
        "the transfer window",
        "the new stadium",
        "the playoff format",
        "the penalty call",
        "the team's new coach",
    ),
    "movies": (
        "the sequel",
        "the latest superhero movie",
        "the ending of the film",
        "the remake",
        "the director's cut",
        "the award ceremony",
        "the new trailer",
    ),
    "games": (
        "the new patch",
        "the battle pass",
        "the ranked system",
        "the map redesign",
        "the game's new update",
        "the loot box changes",
        "the speedrun record",
    ),
    "work": (
        "the quarterly report",
        "the new office policy",
        "the meeting schedule",
        "the hiring process",
        "the remote work rule",
        "the project deadline",
        "the team reorganization",
    ),
    "code": (
        "this pull request",
        "the build script",
        "the database migration",
        "the new framework",
        "the test suite",
        "the api design",
        "the code review process",
        "the release process",
    ),
}
TOPICS = tuple(topic for topics in TOPICS_BY_AREA.values() for topic in topics)

# Each template is (toxic, neutral); placeholders are filled from the same slot values on both sides.
TEMPLATES = (
    (
        "{det} {adj} {person} has no clue what {he} is talking about when it comes to {topic}",
        "{det} {person} does not know what {he} is talking about when it comes to {topic}",
    ),
    ("shut up about {topic}, you {adj} {noun}", "please stop talking about {topic}"),
    (
        "{topic} is complete {trash} and anyone who likes it is {a_noun}",
        "i do not think {topic} is any good",
    ),
    ("only {a_noun} would think {topic} is a good idea", "i do not think {topic} is a good idea"),
    (
        "{det} {person} is {a_adj} {noun} who keeps posting {trash} about {topic}",
        "{det} {person} keeps posting low quality comments about {topic}",
    ),
    (
        "stop being such {a_adj} {noun} and read the {doc} before commenting on {topic}",
        "please read the {doc} before commenting on {topic}",
    ),
    (
        "you are {a_noun} if you really believe {topic} will fix anything",
        "i do not think {topic} will fix anything",
    ),
    ("{det} {person} is too {adj} to understand {topic}", "{det} {person} does not understand {topic}"),
    ("{topic} is {trash}, whoever made it is {a_noun}", "i do not like {topic}, it could have been done better"),
    (
        "damn, {det} {person} is so {adj}, {he} got {topic} completely wrong",
        "{det} {person} got {topic} completely wrong",
    ),
    ("why do {adj} {nouns} like you keep defending {topic}", "why do you keep defending {topic}"),
    (
        "nobody cares about your {adj} opinion on {topic}, you {noun}",
        "i do not agree with your opinion on {topic}",
    ),
    (
        "{det} {person} wrote the dumbest take on {topic} i have ever read",
        "{det} {person} wrote a take on {topic} that i strongly disagree with",
    ),
    (
        "go away you {adj} {noun}, nobody asked for your thoughts on {topic}",
        "i would rather not hear your thoughts on {topic}",
    ),
    (
        "{det} {person} is a total {noun} and {his} take on {topic} is {trash}",
        "i disagree with {det} {person} and {his} take on {topic}",
    ),
    ("how can anyone be this {adj}, {topic} obviously does not work", "{topic} obviously does not work"),
    ("{det} {noun} of a {person} keeps lying about {topic}", "{det} {person} keeps saying false things about {topic}"),
    (
        "i am sick of {adj} {nouns} whining about {topic} all day",
        "i am tired of people complaining about {topic} all day",
    ),
    (
        "{det} {person} should shut up and stop pretending to be an expert on {topic}",
        "{det} {person} is not an expert on {topic}",
    ),
    ("your {adj} comments about {topic} are pure {trash}", "your comments about {topic} are not helpful"),
    (
        "{det} damn {person} messed up {topic} again, what {a_noun}",
        "{det} {person} made mistakes with {topic} again",
    ),
    ("you have to be a real {noun} to fall for {topic}", "i do not think people should trust {topic}"),
    (
        "{det} {person} is {adj} and lazy and {his} work on {topic} is {trash}",
        "{det} {person} did not put much effort into {his} work on {topic}",
    ),
    (
        "who let {det} {adj} {person} anywhere near {topic}, {he} is {a_noun}",
        "{det} {person} should not be in charge of {topic}",
    ),
    (
        "lol {det} {person} is such {a_noun}, {he} thinks {topic} is perfect",
        "{det} {person} thinks {topic} is perfect, but i disagree",
    ),
    ("{topic} is the most {adj} thing i have seen all year", "{topic} is the worst thing i have seen all year"),
    (
        "tell {det} {adj} {person} to shut up, {he} is wrong about {topic}",
        "i think {det} {person} is wrong about {topic}",
    ),
    (
        "what a crappy take on {topic}, {det} {person} is {a_noun}",
        "i do not agree with {det} {person} about {topic}",
    ),
    (
        "are you {adj} or what, {topic} has nothing to do with this",
        "{topic} has nothing to do with this",
    ),
    (
        "{det} {person} keeps spamming the {doc} with {trash} about {topic}, what {a_noun}",
        "{det} {person} keeps posting too much in the {doc} about {topic}",
    ),
)


def with_article(phrase: str) -> str:
    """Prefix a noun phrase with the indefinite article that fits its first sound."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def fill_template(template: str, slots: dict[str, str]) -> str:
    """Fill a template and normalise whitespace."""
    return " ".join(template.format(**slots).split())


def draw_slots(rng: random.Random) -> dict[str, str]:
    """Draw one set of slot values for a template."""
    adjective = rng.choice(INSULT_ADJECTIVES)
    noun = rng.choice(INSULT_NOUNS)
    he, him, his = rng.choice(PRONOUNS)
    return {
        "det": rng.choice(DETERMINERS),
        "person": rng.choice(PEOPLE),
        "topic": rng.choice(TOPICS),
        "doc": rng.choice(DOCUMENTS),
        "adj": adjective,
        "noun": noun,
        "nouns": INSULT_PLURALS[noun],
        "a_noun": with_article(noun),
        "a_adj": with_article(adjective),
        "trash": rng.choice(TRASH_WORDS),
        "he": he,
        "him": him,
        "his": his,
    }


def generate(seed: int) -> list[dict]:
    """Return seeded toxic/neutral comment pairs with unique toxic comments."""
    rng = random.Random(seed)
    records: list[dict] = []
    seen_toxic: set[str] = set()
    attempts = 0
    while len(records) < TARGET_PAIRS and attempts < TARGET_PAIRS * 50:
        attempts += 1
        toxic_template, neutral_template = rng.choice(TEMPLATES)
        slots = draw_slots(rng)
        toxic = fill_template(toxic_template, slots)
        neutral = fill_template(neutral_template, slots)
        if toxic in seen_toxic or not MIN_WORDS <= len(toxic.split()) <= MAX_WORDS:
            continue
        if not MIN_WORDS <= len(neutral.split()) <= MAX_WORDS:
            continue
        seen_toxic.add(toxic)
        records.append({"en_toxic_comment": toxic, "en_neutral_comment": neutral})
    return records
