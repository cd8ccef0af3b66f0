"""A small topic-diverse corpus and paraphrased queries for the dense, hybrid and batching tests
(imported by name: pytest puts this directory on sys.path)."""

from __future__ import annotations

# (title, text): one topic each, so that a paraphrase has one right answer.
TOPICS = [
    (
        "Tarnholm Lighthouse",
        "The Tarnholm Lighthouse stands on a granite cliff and has guided "
        "ships along the northern coast since 1871.",
    ),
    (
        "Velmora Bakery",
        "Velmora Bakery is known for its rye bread and cinnamon pastries, baked "
        "every morning before dawn.",
    ),
    (
        "Oskar Fenwright",
        "Oskar Fenwright was a violinist who performed with orchestras in "
        "Vienna, Prague and Berlin.",
    ),
    (
        "Grelling Glacier",
        "The Grelling Glacier has lost a third of its ice since 1950 as average "
        "temperatures in the valley rose.",
    ),
    (
        "Morrow Clinic",
        "Morrow Clinic treats patients with heart disease and runs a cardiology research unit.",
    ),
    (
        "Pellan Rovers",
        "Pellan Rovers is a football club that has won the national league three times.",
    ),
    (
        "Quarn",
        "Quarn is a programming language with static types that compiles to fast machine code.",
    ),
    (
        "Mount Ossery",
        "Mount Ossery is an active volcano whose last eruption buried two villages in ash.",
    ),
    (
        "Lenwick Railway",
        "The Lenwick Railway carries passengers between the harbour and the "
        "mining towns in the hills.",
    ),
    ("Amber Finch", "The amber finch is a small songbird that nests in reeds and eats seeds."),
    (
        "Darrow Observatory",
        "Darrow Observatory houses a large telescope used to study distant galaxies.",
    ),
    (
        "Selby Museum",
        "The Selby Museum displays ancient pottery, coins and bronze tools found in "
        "local excavations.",
    ),
    (
        "Hallam Coffee",
        "Hallam Coffee roasts beans from the highlands and sells espresso in its cafes.",
    ),
    (
        "Brisk Terrier",
        "The brisk terrier is a dog breed with a wiry coat, bred to hunt rats on farms.",
    ),
    (
        "Orvane Desert",
        "The Orvane Desert receives almost no rain, and its dunes shift with the wind.",
    ),
    (
        "Kessel Bridge",
        "The Kessel Bridge is a suspension bridge whose steel cables carry the "
        "road across the river Varn.",
    ),
    ("Tilde Marsh", "Tilde Marsh was a chess grandmaster who won the world championship in 1987."),
    (
        "Ferrow Vaccine",
        "The Ferrow vaccine protects children against measles and is given in two doses.",
    ),
    ("Aster-3", "Aster-3 is a weather satellite that photographs clouds and storms from orbit."),
    (
        "Corvin Election",
        "In the Corvin election of 2004 the ruling party lost its majority in parliament.",
    ),
    ("Ninefold Tax Act", "The Ninefold Tax Act raised the levy on imported tobacco and alcohol."),
    ("Hollow Sonnets", "Hollow Sonnets is a book of love poems written during a long winter."),
    ("Ilse Broad", "Ilse Broad painted landscapes of misty mountains in oil on canvas."),
    (
        "Rennet Cheese Fair",
        "The Rennet Cheese Fair is an annual market where farmers sell goat and sheep cheese.",
    ),
    ("Garrow Dam", "The Garrow Dam holds back a reservoir and its turbines generate electricity."),
    ("Lumen Lab", "Lumen Lab builds solar panels and batteries for homes."),
    ("Saltmere", "Saltmere is a fishing village where boats bring in herring and cod."),
    ("Wendt Academy", "Wendt Academy is a boarding school that teaches mathematics and Latin."),
    ("Yarrow Festival", "The Yarrow Festival celebrates the harvest with dancing and folk music."),
    ("Copper Vale Mine", "Copper Vale Mine closed in 1962 after its ore ran out."),
]
# (query, title of the one right passage): few shared words, the meaning carries the match.
PARAPHRASES = [
    ("Which tower warns sailors near the rocky shore?", "Tarnholm Lighthouse"),
    ("where can I buy fresh loaves early in the day", "Velmora Bakery"),
    ("a famous string musician who played concerts", "Oskar Fenwright"),
    ("ice sheet shrinking because of climate warming", "Grelling Glacier"),
    ("hospital for people with cardiac illness", "Morrow Clinic"),
    ("soccer team with championship titles", "Pellan Rovers"),
    ("coding language with a type checker", "Quarn"),
    ("mountain that spews lava", "Mount Ossery"),
    ("train line to the mines", "Lenwick Railway"),
    ("a little bird living in wetlands", "Amber Finch"),
]
CORPUS = [{"id": f"t{i}", "title": t, "text": x} for i, (t, x) in enumerate(TOPICS)]
TITLE_TO_ID = {p["title"]: p["id"] for p in CORPUS}
