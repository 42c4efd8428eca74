from edgellama.cli import main

raise SystemExit(main())
