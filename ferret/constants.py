"""Special tokens, ids and the coordinate grid shared by every part of Ferret.

Only this module names these numbers; everything else imports them.
"""

IGNORE_INDEX = -100
# Placeholder id for image positions in `input_ids`; the processor expands the image to one such id per patch.
IMAGE_TOKEN_INDEX = -200

IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region_fea>"

# Text coordinates live on a GRID_SIZE x GRID_SIZE grid of the model input (values 0..GRID_SIZE-1).
GRID_SIZE = 1000
# A point region's feature mask is a (2 * POINT_SPAN + 1)^2 window around the point.
POINT_SPAN = 5

# CLIP image normalisation (openai/clip-vit-large-patch14-336).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"

CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15
