"""The synthetic shop whose items are known by a vector only: the cold-start check of the 'vector' feature kind.

  python -m mtl_rec.cold_start_benchmark --config=configs/shop_vectors.py --out=W --cold_items=0.2
  python train.py --config=configs/shop_vectors.py --workdir=W

configs/shop.py's tasks on generated data (data.synthetic.generator='shop', no files). The items table's 'embedding'
column is the item's planted factors, popularity and quality through a random linear map, plus noise: what a
pretrained encoder of an item's content gives. Besides the item's id it is the item's only feature, so a model
without it knows nothing of an item no one has clicked, and one with it can place the item from the vector alone.
"""

from configs import shop
from mtl_rec.config import feature

VECTOR_DIM = 16


def get_config():
  c = shop.get_config()
  c.name = 'shop_vectors'  # model name in exports and serving
  c.data.name = 'shop_vectors'
  c.data.source = 'synthetic'  # generated from config.seed
  c.data.synthetic.generator = 'shop'
  c.data.synthetic.num_users = 2000
  c.data.synthetic.num_items = 500
  c.data.synthetic.interactions_per_user = 20
  c.data.synthetic.latent_dim = 4
  c.data.synthetic.item_vector_dim = VECTOR_DIM
  with c.unlocked():
    for name in ('category', 'tags', 'price'):  # the vector is the items' only content
      del c.features[name]
    c.features.embedding = feature('item', kind='vector', dim=VECTOR_DIM)
  return c
