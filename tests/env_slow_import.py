"""An environment module that takes $GSPO_TEST_IMPORT_S seconds to import."""

import os
import time

time.sleep(float(os.environ.get("GSPO_TEST_IMPORT_S", "0")))


class Env:
    def __init__(self, row):
        self.row = row

    def reset(self):
        return [{"role": "user", "content": "hi"}]

    def step(self, text):
        return [], True, None
