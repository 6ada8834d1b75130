"""The broker, read when the app's configuration is first needed (``config_from_object`` is
lazy), not when ``workers.app`` is imported: naming the embedded Redis starts it."""

from pipeline.config import get_settings
from pipeline.coordination.redisconn import broker_url as _broker_url

broker_url = _broker_url(get_settings())
