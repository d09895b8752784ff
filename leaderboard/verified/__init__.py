"""The verified track: attack code the organizer runs on fresh hidden evaluation releases.

``runs`` queues runs, builds evaluation releases from committed seeds and records results;
``sandbox`` confines each run (bubblewrap, limits). May import the results core, challenge and
attacks; never the server or the board.
"""
