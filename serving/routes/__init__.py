"""The API's routes, one router per concern; `serving.app.create_app` includes them."""
