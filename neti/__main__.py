from neti.cli import main

raise SystemExit(main())
